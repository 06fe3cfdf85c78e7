"""Triton Python-backend model ``clse_generate``: prefill then decode token by token, each step a BLS call to
the repository's ONNX models. ``clse_fx.deploy.triton`` copies this file as ``clse_generate/1/model.py``, next
to ``clse_runtime.py`` (a copy of ``clse_fx/deploy/loop.py``, whose loop it runs) and ``settings.json``.

Inputs are the bundle's compiled-shape feeds (``Engine.encode`` makes them), plus the optional scalars
max_new_tokens, do_sample, temperature, top_k and seed; outputs are ``output_ids`` [batch, longest answer]
(-1 after each row's end) and ``output_lengths`` [batch].
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from clse_runtime import (
    SamplingConfig,
    check_finite_feeds,
    check_prompt_feeds,
    check_valid_rows,
    copy_written_slots,
    decode_start,
    generation_loop,
)


class TritonPythonModel:
    """The generation loop of ``clse_fx.deploy.engine`` over BLS calls to the pipeline, prefill and decode models."""

    def initialize(self, args: dict) -> None:
        """Read the model names, tensor names and limits the repository generator wrote."""
        self.settings = json.loads(Path(__file__).with_name("settings.json").read_text())

    def execute(self, requests: list) -> list:
        """One response per request; a failing request answers its error and the others still run."""
        responses = []
        for request in requests:
            try:
                responses.append(self._generate(request))
            except Exception as error:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(error))))
        return responses

    def _infer(self, graph: dict, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = pb_utils.InferenceRequest(
            model_name=graph["model"],
            requested_output_names=graph["outputs"],
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(feeds[name])) for name in graph["inputs"]],
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        )
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(response.error().message())
        return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in graph["outputs"]]

    def _prefill(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, *cache, valid = self._infer(self.settings["prefill"], feeds)  # logits, cache and validity only
        check_valid_rows(valid)  # a direct clse_prefill caller gets ``valid`` and must check it the same way
        return logits, cache

    def _decode(
        self, input_ids, position_ids, pad_counts, cache_lengths, buffers: list[np.ndarray]
    ) -> list[np.ndarray]:
        # BLS sends every input (the KV buffers too) to clse_decode each step: no binding across calls here.
        graph = self.settings["decode"]
        step = [input_ids, position_ids, pad_counts, cache_lengths, *buffers]
        outputs = self._infer(graph, dict(zip(graph["inputs"], step)))
        if not self.settings["decode_writes_kv_cache"]:
            return outputs  # the logits and each layer's new key/value, which the loop writes
        logits, *presents = outputs  # the buffers as the graph wrote them, copies here
        copy_written_slots(buffers, presents, cache_lengths)
        return [logits]

    def _generate(self, request):
        settings = self.settings

        def scalar(name: str, default):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return default if tensor is None else tensor.as_numpy().reshape(-1)[0].item()

        max_new_tokens = int(scalar("max_new_tokens", settings["max_new_tokens"]))
        limit = settings["max_new_tokens_limit"]
        if not 1 <= max_new_tokens <= limit:
            raise ValueError(f"max_new_tokens must be between 1 and {limit}")
        seed = scalar("seed", None)
        sampling = SamplingConfig(  # raises ValueError, answered as this request's error, on a bad setting
            do_sample=bool(scalar("do_sample", False)),
            temperature=float(scalar("temperature", 1.0)),
            top_k=int(scalar("top_k", 0)),
            seed=None if seed is None else int(seed),
        )
        feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in settings["inputs"]}
        check_prompt_feeds(  # before any model runs: a bad request is this request's error, never a wrong answer
            feeds["input_ids"],
            feeds["attention_mask"],
            settings["shape"],
            settings["visual_token_ids"],
            settings["visual_tokens_per_prompt"],
            settings["vocab_size"],
        )
        check_finite_feeds(feeds)
        for graph in settings["pipeline"]:  # as Engine.run_input_graphs: each adds its outputs to the feeds
            feeds.update(zip(graph["outputs"], self._infer(graph, feeds)))
        ids, _ = generation_loop(
            self._prefill,
            self._decode,
            feeds,
            decode_start(feeds, settings["decode_position_start"], settings["position_offset_input"]),
            max_new_tokens,
            sampling,
            sampling.rng(),
            set(settings["stop_token_ids"]),
        )
        lengths = np.array([len(row) for row in ids], dtype=np.int64)
        output = np.full((len(ids), int(lengths.max())), -1, dtype=np.int64)
        for i, row in enumerate(ids):
            output[i, : len(row)] = row
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("output_ids", output), pb_utils.Tensor("output_lengths", lengths)]
        )
