"""Feature taps: the tensors the losses need, read out of a model by module path.

``FeatureTaps(model, names, *, pre_relu=False, detach=False)`` registers forward
hooks on the named modules while started (``with taps:`` or ``start()`` /
``stop()``) and keeps each module's value of the latest forward in
``taps.features`` (a dict keyed by the names as given). ``ofd_points(model)``
names OFD's distillation points and the BN whose affine parameters give each
point's margin, for torchvision-structured ResNets, pre-activation WideResNets
and MobileNetV2.

What ``pre_relu=True`` captures, for a named module M:
- if M's output is the output of an ``nn.ReLU`` / ``nn.ReLU6`` module call made
  during M's forward (M itself, or the last such call inside it), the *input* of
  that call. torchvision's BasicBlock calls its one ``relu`` twice, after ``bn1``
  and after the residual sum; the block returns the second call's output, so the
  second call's input, the pre-ReLU sum, is captured (the first call is not).
- otherwise M's own output, which is what the following ReLU receives (e.g. a BN
  before a ReLU).
An in-place ReLU (``inplace=True``) would overwrite the captured tensor, so while
the taps run, each in-place ReLU/ReLU6 module call that could do so (one inside a
tapped module, or one whose input is a captured output) runs out of place for
that call: its ``inplace`` flag is off for the call and restored right after.
Nothing is copied; the ReLU writes a fresh output instead of its input. Values and
gradients are the same as without taps. A model that relies on the side effect of
an in-place ReLU module whose result it discards (``self.relu(x); return x``) is
reported with a RuntimeError. Any other in-place change of a captured tensor (a
functional ``F.relu_``, ``x += y``) is detected from the tensor's version counter
when the features are read, and raises rather than returning a changed value (not under
``torch.inference_mode``, whose tensors have no version counter, nor inside compiled code).
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["FeatureTaps", "ofd_points", "RELU_TYPES"]

RELU_TYPES = (nn.ReLU, nn.ReLU6)  # the modules whose input ``pre_relu=True`` captures
_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)
# grad_fn names of a functional ReLU/ReLU6 output, which a pre-ReLU capture must not be
_RELU_GRAD_FNS = {"ReluBackward0", "ReluBackward1", "HardtanhBackward0", "HardtanhBackward1",
                  "ThresholdBackward0", "ThresholdBackward1"}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, _WRAPPERS) else model


def _resolve(model: nn.Module, name: str) -> nn.Module:
    """The module at path ``name`` (as ``named_modules`` gives it; a ``module.`` prefix of a DDP or
    DataParallel wrapper may be there or not)."""
    inner = _unwrap(model)
    path = name[len("module."):] if inner is not model and name.startswith("module.") else name
    try:
        return inner.get_submodule(path)
    except AttributeError:
        some = [n for n, _ in inner.named_modules() if n][:8]
        raise ValueError(f"names: no module {name!r} in {type(inner).__name__} (paths as named_modules() "
                         f"gives them, e.g. {some})") from None


class FeatureTaps:
    """Forward hooks that keep the outputs (or pre-ReLU values) of named modules.

    ``features`` after a forward: {name: Tensor} of that forward (cleared when the next
    forward of ``model`` starts, so nothing leaks from one step into the next).
    ``detach=True`` stores detached tensors (for a teacher). Hooks exist only between
    ``start()`` and ``stop()``: a stopped tap leaves the model exactly as it was.
    The last call wins when a named module runs more than once in one forward.
    """

    def __init__(self, model: nn.Module, names: Union[str, Iterable[str]], *, pre_relu: bool = False,
                 detach: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        names = [names] if isinstance(names, str) else list(names)
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"names: expected a non-empty list of module paths (str), got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"names: each module path once, got {names!r}")
        if isinstance(model, nn.DataParallel) and len(model.device_ids) > 1:
            raise ValueError(f"model: DataParallel over {len(model.device_ids)} devices runs the hooks in one thread "
                             f"per replica, each on a shard of the batch; tap the model under "
                             f"DistributedDataParallel (one process per device) instead")
        self.model, self.pre_relu, self.detach = model, bool(pre_relu), bool(detach)
        self._targets = {name: _resolve(model, name) for name in names}
        self._relus = [m for m in _unwrap(model).modules() if isinstance(m, RELU_TYPES)] if pre_relu else []
        self._handles: list = []
        self._features: Dict[str, Tensor] = {}
        self._versions: Dict[str, int] = {}
        self._reset_forward()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "FeatureTaps":
        if self._handles:
            raise RuntimeError("FeatureTaps.start: already started")
        self.clear()
        reg = self._handles.append
        # order: root pre-hook first and root hook last; a ReLU's hook runs before the hook of a
        # tapped module that ends with it (also when the ReLU itself is tapped)
        for relu in self._relus:
            reg(relu.register_forward_pre_hook(self._relu_pre))
            reg(relu.register_forward_hook(self._relu_post, always_call=True))
        for name, module in self._targets.items():
            if self.pre_relu:
                reg(module.register_forward_pre_hook(lambda m, a, name=name: self._target_pre(name), prepend=True))
            reg(module.register_forward_hook(lambda m, a, out, name=name: self._target_post(name, out),
                                             always_call=True))
        reg(self.model.register_forward_pre_hook(self._root_pre, prepend=True))
        reg(self.model.register_forward_hook(self._root_post, always_call=True))
        return self

    def stop(self) -> None:
        """Remove every hook. The features of the last forward stay readable until ``clear()``."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._reset_forward()

    def clear(self) -> None:
        self._features.clear()
        self._versions.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "FeatureTaps":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- reading
    @property
    def features(self) -> Dict[str, Tensor]:
        """{name: tensor} of the latest forward (a new dict; the tensors are the captured ones)."""
        for name, t in self._features.items():
            self._check_unchanged(name, t)
        return dict(self._features)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._features:
            if name not in self._targets:
                raise KeyError(f"{name!r} is not one of the tapped names {list(self._targets)}")
            raise KeyError(f"{name!r}: nothing captured (the module did not run since the last forward of the "
                           f"model started, or the taps were not started; under torch.compile, taps started after "
                           f"the compiled model's first call are not seen unless "
                           f"torch._dynamo.config.skip_nnmodule_hook_guards is False)")
        t = self._features[name]
        self._check_unchanged(name, t)
        return t

    def pop(self) -> Dict[str, Tensor]:
        """The features, and forget them."""
        out = self.features
        self.clear()
        return out

    def _check_unchanged(self, name: str, t: Tensor) -> None:
        version = self._versions.get(name)
        if version is not None and t._version != version:
            hint = "" if self.pre_relu else " (pre_relu=True guards against in-place ReLU modules)"
            raise RuntimeError(f"FeatureTaps: the tensor captured at {name!r} was modified in place after capture "
                               f"(version {version} -> {t._version}), e.g. by a functional relu_ or +=, so it no "
                               f"longer holds the value the module gave{hint}; tap another point or make that "
                               f"operation out of place")

    # ---------------------------------------------------------------- hooks
    def _reset_forward(self) -> None:
        self._pending: List[Tensor] = []  # captured outputs an in-place ReLU must not overwrite
        self._entered: Dict[str, List[int]] = {}  # per tapped module: ReLU call count at entry
        self._active = 0  # tapped modules inside their forward
        self._calls = 0  # ReLU calls recorded in this forward
        self._last_relu: Optional[Tuple[int, Tensor, Tensor]] = None  # (call no, input, output)
        self._flipped: List[nn.Module] = []  # ReLUs running out of place for this call

    def _root_pre(self, module, args) -> None:
        self.clear()
        self._reset_forward()

    def _root_post(self, module, args, output) -> None:
        for relu in self._flipped:  # only after an exception inside a ReLU call
            relu.inplace = True
        self._reset_forward()

    def _target_pre(self, name: str) -> None:
        self._active += 1
        self._entered.setdefault(name, []).append(self._calls)

    def _target_post(self, name: str, output) -> None:
        if self.pre_relu:
            self._active -= 1
            entered = self._entered[name].pop()
        if output is None:  # the module raised (this hook runs anyway, to keep the counts right)
            return
        if not isinstance(output, Tensor):
            raise TypeError(f"FeatureTaps: module {name!r} returned {type(output).__name__}, not a Tensor; "
                            f"tap a submodule that returns a tensor")
        value = output
        if self.pre_relu:
            last = self._last_relu
            if last is not None and last[0] > entered and last[2] is output:
                value = last[1]  # M returns that ReLU call's output: capture its input
            else:
                self._check_not_post_relu(name, output, last, entered)
                self._pending.append(output)  # a later in-place ReLU must not overwrite it
        if self.detach:
            value = value.detach()  # shares the version counter, so the in-place check still sees changes
        self._features[name] = value
        if not (torch.compiler.is_compiling() or value.is_inference()):  # inference tensors have no version
            self._versions[name] = value._version

    def _check_not_post_relu(self, name: str, output: Tensor, last, entered: int) -> None:
        if last is not None and last[0] > entered and last[1] is output:
            raise RuntimeError(f"FeatureTaps: module {name!r} returned the input of its in-place ReLU call and "
                               f"discarded that call's result (self.relu(x); return x): the taps run that ReLU "
                               f"out of place, which such a model cannot tolerate; assign the ReLU's result")
        if torch.compiler.is_compiling():  # Dynamo cannot trace grad_fn
            return
        if output.grad_fn is not None and type(output.grad_fn).__name__ in _RELU_GRAD_FNS:
            raise RuntimeError(f"FeatureTaps(pre_relu=True): the output of {name!r} comes from a functional "
                               f"relu (F.relu / torch.relu), which hooks cannot see past; tap the module whose "
                               f"output enters it")

    def _relu_pre(self, module, args) -> None:
        if module.inplace and args and (self._active or any(args[0] is t for t in self._pending)):
            module.inplace = False
            self._flipped.append(module)

    def _relu_post(self, module, args, output) -> None:
        if self._flipped and self._flipped[-1] is module:
            self._flipped.pop()
            module.inplace = True
        if self._active and args:
            self._calls += 1
            self._last_relu = (self._calls, args[0], output)


# --------------------------------------------------------------------------- OFD points
def ofd_points(model: nn.Module) -> List[Tuple[str, _BatchNorm]]:
    """OFD's distillation points of ``model``: [(module path, BN)], in forward order.

    Tap the paths with ``FeatureTaps(model, [n for n, _ in points], pre_relu=True)`` and take
    each margin from its BN: ``kdk.ofd_margin_from_bn(bn)``. As in the OFD authors' code:
    - ResNet (children ``layer1``..``layerN`` of BasicBlock/Bottleneck-shaped blocks,
      torchvision's layout): the pre-ReLU sum of each stage's last block (path ``layerI.J``);
      margin BN: that block's last residual-branch BN (``bn2`` / ``bn3``). That BN describes
      the residual branch only, not the sum with the shortcut; the official code uses it
      anyway, and so does this.
    - pre-activation WideResNet (``block1``..``blockN`` with ``.layer`` of blocks that start
      with ``bn1``/``relu1``, and a final BN): for each stage but the last, the next stage's
      first ``bn1`` output; for the last, the final BN's output; the margin BN is that BN.
    - MobileNetV2 (``features`` of inverted residuals with ``.conv``): the stage ends at the
      56/28/14-pixel resolutions of an ImageNet model, i.e. the first BN (before ReLU6) of each
      stride-2 block but the first, plus the BN of the final 1x1 conv before its ReLU6
      (torchvision's ``features[-1]``) or, without one, the last block's output with its
      projection BN as the margin BN (the OFD segmentation backbone, whose last block has no
      residual, so that output is the BN's).
    Any other model raises a ValueError that says how to name the points by hand.
    """
    inner = _unwrap(model)
    for find in (_resnet_points, _wrn_points, _mobilenetv2_points):
        points = find(inner)
        if points:
            return points
    raise ValueError(
        f"model: ofd_points does not know {type(inner).__name__}; it recognises torchvision-structured ResNets "
        f"(layer1..layerN of BasicBlock/Bottleneck blocks), pre-activation WideResNets (block1..blockN with .layer "
        f"and a final BN) and MobileNetV2 (features of inverted residuals). Name the points by hand: the module "
        f"whose pre-ReLU value is distilled and the teacher BN before that ReLU, e.g. "
        f"points = [('layer3.1', model.layer3[1].bn2)]; taps = kdk.taps.FeatureTaps(model, [n for n, _ in points], "
        f"pre_relu=True); margins = [kdk.ofd_margin_from_bn(bn) for _, bn in points]")


def _children(module: nn.Module) -> List[str]:
    return [n for n, _ in module.named_children()]


def _resnet_points(model: nn.Module):
    stages = [(n, c) for n, c in model.named_children()
              if re.fullmatch(r"layer\d+", n) and isinstance(c, nn.Sequential) and len(c)]
    points = []
    for name, stage in stages:
        block = stage[-1]
        kids = _children(block)
        last_bn = "bn3" if "bn3" in kids else "bn2"
        # post-activation blocks: conv before its BN (a pre-activation block starts with its BN)
        if not {"conv1", "bn1", "conv2", "bn2"} <= set(kids) or kids.index("conv1") > kids.index("bn1"):
            return None
        bn = getattr(block, last_bn)
        if not isinstance(bn, _BatchNorm):
            return None
        points.append((f"{name}.{len(stage) - 1}", bn))
    return points


def _wrn_points(model: nn.Module):
    stages = [(n, c) for n, c in model.named_children()
              if re.fullmatch(r"block\d+", n) and isinstance(getattr(c, "layer", None), nn.Sequential)]
    if not stages:
        return None
    for _, stage in stages:
        first = stage.layer[0]
        if not (isinstance(getattr(first, "bn1", None), _BatchNorm) and _children(first)[:2] == ["bn1", "relu1"]):
            return None
    after = _children(model)[_children(model).index(stages[-1][0]) + 1:]
    final = [n for n in after if isinstance(getattr(model, n), _BatchNorm)]
    if len(final) != 1:
        return None
    points = [(f"{n}.layer.0.bn1", s.layer[0].bn1) for n, s in stages[1:]]
    return points + [(final[0], getattr(model, final[0]))]


def _first_bn(module: nn.Module, prefix: str, last: bool = False):
    bns = [(f"{prefix}.{n}" if n else prefix, m) for n, m in module.named_modules() if isinstance(m, _BatchNorm)]
    return (bns[-1] if last else bns[0]) if bns else None


def _mobilenetv2_points(model: nn.Module):
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        return None
    blocks = [(i, m) for i, m in enumerate(features)
              if isinstance(getattr(m, "conv", None), nn.Sequential) and hasattr(m, "use_res_connect")]
    if not blocks:
        return None

    def stride(block):
        dw = [c for c in block.conv.modules() if isinstance(c, nn.Conv2d) and c.groups > 1]
        return dw[0].stride[0] if dw else 1

    down = [(i, b) for i, b in blocks if stride(b) == 2]
    points = [_first_bn(b, f"features.{i}") for i, b in down[1:]]
    last = blocks[-1][0]
    tail = [(i, m) for i, m in enumerate(features) if i > last and _first_bn(m, f"features.{i}")]
    if tail:
        points.append(_first_bn(tail[-1][1], f"features.{tail[-1][0]}"))
    else:  # the last block's output (no ReLU follows); its margin BN is the projection BN
        bn = _first_bn(features[last], f"features.{last}", last=True)
        points.append(bn and (f"features.{last}", bn[1]))
    return None if any(p is None for p in points) else points
