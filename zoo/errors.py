"""The errors `zoo` raises on purpose.

Each subclasses a builtin as well, so callers may catch either. Every message is one line
that ends with the next step for the user; the CLI prints it and exits non-zero.
"""

from __future__ import annotations


class ZooError(Exception):
    """Base of every error `zoo` raises on purpose."""

    exit_code = 1


class NotFound(ZooError, LookupError):
    """A catalog name, workspace model, run or file that does not exist."""


class DownloadError(ZooError, OSError):
    """A download that failed after its retries (network, HTTP status, timeout)."""


class ChecksumMismatch(ZooError, OSError):
    """A file whose sha256 or size differs from what was expected."""


class InvalidModelFile(ZooError, ValueError):
    """A file that is not a usable ONNX model (HTML page, LFS pointer, truncated, garbage)."""


class UnsafeFile(ZooError, ValueError):
    """A model or archive that points outside its folder (external data, archive members)."""


class UnsupportedModel(ZooError, ValueError):
    """A model the pipeline cannot convert, probe or adapt."""


class ImportFidelityError(UnsupportedModel):
    """The converted torch module does not match onnxruntime on the same inputs."""


class UnupgradableModel(UnsupportedModel):
    """A file at an old opset that `onnx.version_converter` cannot bring to an opset onnxruntime runs."""

    def __init__(self, opset: int, reason: str, message: str | None = None) -> None:
        self.opset = opset
        self.reason = reason
        super().__init__(
            message
            or f"a model at opset {opset} cannot be upgraded to an opset onnxruntime runs "
            f"({reason}); re-export it at opset 7 or newer"
        )

    def __reduce__(self):  # noqa: ANN204  (keeps opset and reason across processes)
        return type(self), (self.opset, self.reason, str(self))


class DataError(ZooError, ValueError):
    """A data source that cannot be used for training or evaluation."""


class TrainingError(ZooError, RuntimeError):
    """Training stopped (non-finite loss, out of memory at batch 1, interrupted)."""


class VerificationFailed(ZooError, RuntimeError):
    """An exported model does not match the torch model it came from."""


class DiskFull(ZooError, OSError):
    """Writing failed because the disk is full."""


class Interrupted(TrainingError):
    """Ctrl-C during a long job; what was complete is saved."""

    exit_code = 130


class InvalidOption(ZooError, TypeError):
    """An option the function does not take, or a value outside its range (the Python API)."""
