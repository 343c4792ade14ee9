"""Makes the PyTorch reference libraries importable on a CPU-only torch.

pip resolves timm's torchvision dependency to a CUDA build whose compiled ops (`_C.so`) do not load on
the CPU torch wheel. `import torchvision` then fails in its fake-kernel registrations with
"operator torchvision::nms does not exist", and takes `import timm` and every transformers model import
down with it. None of the reference models use torchvision ops, so when the library cannot be loaded
we declare the two operator schemas that the import registers fake kernels for; calling them would
still fail loudly ("no kernel registered").
"""
import importlib.util
import os

_LIBRARIES = []  # torch.library.Library objects must stay alive for their definitions to persist


def install() -> None:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    compiled = os.path.join(list(spec.submodule_search_locations)[0], "_C.so")
    try:
        torch.ops.load_library(compiled)
        return
    except (OSError, RuntimeError):
        pass
    try:
        torch.ops.torchvision.nms  # noqa: B018  (already defined by an earlier call)
        return
    except (AttributeError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold, float scale, "
                   "int zero_point) -> Tensor")
    _LIBRARIES.append(library)
