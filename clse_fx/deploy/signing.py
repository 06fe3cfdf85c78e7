"""Signed bundles, with OpenSSF's model-signing library (key-based, offline; the ``sign`` extra).

The signature covers ``manifest.json``, which holds the sha256 of every other file of the bundle, and a runtime
checks every file it reads against the manifest (:mod:`clse_fx.deploy.verify`): a valid signature therefore vouches
for the whole bundle, while verifying it costs one small file's hash instead of the weights' (the files' own
hashes are cached between loads). The signature is a Sigstore bundle over the manifest as model-signing writes
it, so it can also be checked without clse-fx: ``model_signing verify key BUNDLE/manifest.json --signature
BUNDLE/manifest.json.sig --public_key KEY.pub``, then ``sha256sum`` each file against the manifest's ``files``.

Keys are elliptic-curve keys in PEM form (model-signing's key signer), e.g.
``openssl ecparam -name prime256v1 -genkey -noout -out key.pem`` and ``openssl ec -in key.pem -pubout -out key.pub``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from clse_fx.deploy.manifest import MANIFEST, error_line

SIGNATURE = f"{MANIFEST}.sig"
MAX_SIGNATURE_BYTES = 1 << 20
INSTALL_HINT = "pip install 'clse-fx[sign]'"


def _model_signing():
    try:
        import model_signing
    except ImportError as error:
        raise ValueError(f"signed bundles need OpenSSF's model-signing library ({error}); {INSTALL_HINT}") from None
    return model_signing


def signer(private_key: str | Path):
    """A model-signing configuration that signs with ``private_key``, loaded now: a missing library or a key it
    cannot read is a one-line error before any work is done."""
    model_signing = _model_signing()
    try:
        return model_signing.signing.Config().use_elliptic_key_signer(private_key=Path(private_key))
    except (OSError, ValueError, TypeError) as error:
        reason = error_line(error)
        raise ValueError(f"cannot sign with {private_key}: {reason}; pass an EC private key (PEM)") from None


def sign_manifest(bundle: Path, private_key: str | Path) -> Path:
    """Sign ``bundle``'s manifest.json with ``private_key``; returns the signature's path."""
    signature = bundle / SIGNATURE
    signer(private_key).sign(bundle / MANIFEST, signature)
    return signature


def verify_manifest(bundle: Path, data: bytes, public_key: str | Path) -> None:
    """Check that ``data`` (``bundle``'s manifest.json, as it will be parsed) carries a signature that
    ``public_key`` verifies; otherwise a one-line ValueError. The bytes are verified as a private copy, so the
    manifest that is parsed is the one that was verified, whatever happens to the file meanwhile."""
    model_signing = _model_signing()
    signature = bundle / SIGNATURE
    if not signature.is_file() or signature.stat().st_size > MAX_SIGNATURE_BYTES:
        raise ValueError(f"{bundle} is not signed (no {SIGNATURE}); sign it with clse-compile --sign KEY")
    try:
        verifier = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=Path(public_key))
    except (OSError, ValueError, TypeError) as error:
        reason = error_line(error)
        raise ValueError(f"cannot verify with {public_key}: {reason}; pass an EC public key (PEM)") from None
    with tempfile.TemporaryDirectory(prefix="clse-fx-manifest.") as scratch:
        copy = Path(scratch) / MANIFEST
        copy.write_bytes(data)
        try:
            verifier.verify(copy, signature)
        except Exception as error:  # JSON, protobuf, key and hash errors alike: it does not verify
            raise ValueError(
                f"{bundle}'s manifest is not signed by {public_key} ({error_line(error)}): the bundle was changed "
                "after signing or signed with another key; do not run it"
            ) from None
