"""Float16 CPU matrix products in float32 (clse_fx.cpu_half): the same results as PyTorch's float16 kernels up to
summation order, only for float16 on the CPU and products of many rows."""

import contextlib

import torch

from clse_fx.cpu_half import Float32Matmuls, float32_matmuls


def test_float16_products_match_pytorchs_own_kernels_and_stay_float16():
    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=generator).half() for shape in [(3, 160, 64), (48, 64), (48,)])
    expected = [torch.nn.functional.linear(x, w, b), torch.nn.functional.linear(x[0], w), x @ x.transpose(1, 2)]
    with Float32Matmuls():
        got = [torch.nn.functional.linear(x, w, b), torch.nn.functional.linear(x[0], w), x @ x.transpose(1, 2)]
        untouched = torch.ones(2, 2) @ torch.ones(2, 2)  # float32 goes through as it is
        one_row = torch.nn.functional.linear(x[0, :1], w)  # a decode step's product: PyTorch's own kernel
    assert torch.equal(one_row, torch.nn.functional.linear(x[0, :1], w))
    for have, want in zip(got, expected):
        assert have.dtype == torch.float16
        # one float16 rounding step of the largest value: the two differ in summation order only
        assert (have.float() - want.float()).abs().max() <= want.float().abs().max() * 2**-10
    assert untouched.dtype == torch.float32


def test_only_a_float16_model_on_the_cpu_gets_the_mode(tiny_llava):
    assert isinstance(float32_matmuls(tiny_llava), contextlib.nullcontext)  # float32
    assert isinstance(float32_matmuls(torch.nn.Linear(2, 2).half()), Float32Matmuls)
