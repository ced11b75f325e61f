"""Build the three networks from an official model directory and load its weights strictly.

A CosyVoice-300M directory holds ``cosyvoice.yaml`` (sizes and class names), ``llm.pt``, ``flow.pt``, ``hift.pt``
(state dicts) and, in -SFT and -Instruct, ``spk2info.pt`` (speaker embeddings; the base model has none: it speaks
with voices made from a clip). Every size comes from the yaml, so the
full-size model and the tiny test models go through the same code. The speed mode's precision policy
(``precision.py``) is handed to the builders, so the networks are built in the mode's form and the float32
checkpoints are converted while they are loaded.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import stat
from pathlib import Path

import torch

from .config import ConfigError, Name, New, read_config
from .cosyvoice import CosyVoiceSFT
from .hift import normalize_hift_state_dict
from .layers import NonFiniteWeight, checkpoint_form
from .mapping import clear_mappings, copy_out_of_mappings, register_mapping, release_pages
from .precision import EXACT, Precision
from .modes import mode_settings
from .transformer import fuse_qkv_keys

log = logging.getLogger(__name__)

SPEAKERS_FILE = "spk2info.pt"  # the built-in speakers of -SFT and -Instruct; the base model (CosyVoice-300M) has none
REQUIRED_FILES = ("cosyvoice.yaml", "llm.pt", "flow.pt", "hift.pt")
MODEL_FILES = (*REQUIRED_FILES, SPEAKERS_FILE)  # every checkpoint file the loader reads, where present

# Official class path -> our implementation (module in this package, class name).
CLASSES = {
    "cosyvoice.llm.llm.TransformerLM": ("llm", "TransformerLM"),
    "cosyvoice.transformer.encoder.ConformerEncoder": ("transformer", "ConformerEncoder"),
    "cosyvoice.transformer.encoder.TransformerEncoder": ("transformer", "TransformerEncoder"),
    "cosyvoice.flow.flow.MaskedDiffWithXvec": ("flow", "MaskedDiffWithXvec"),
    "cosyvoice.flow.length_regulator.InterpolateRegulator": ("flow", "InterpolateRegulator"),
    "cosyvoice.flow.flow_matching.ConditionalCFM": ("flow_matching", "ConditionalCFM"),
    "cosyvoice.flow.decoder.ConditionalDecoder": ("estimator", "ConditionalDecoder"),
    "cosyvoice.hifigan.generator.HiFTGenerator": ("hift", "HiFTGenerator"),
    "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor": ("hift", "ConvRNNF0Predictor"),
}
SAMPLERS = {"cosyvoice.utils.common.ras_sampling"}

# Classes of the later CosyVoice generations: recognised only to say clearly what the directory is.
OTHER_GENERATIONS = {
    "cosyvoice.llm.llm.Qwen2LM": "CosyVoice2",
    "cosyvoice.flow.flow.CausalMaskedDiffWithXvec": "CosyVoice2",
    "cosyvoice.llm.llm.CosyVoice3LM": "CosyVoice3",
    "cosyvoice.flow.flow.CausalMaskedDiffWithDiT": "CosyVoice3",
    "cosyvoice.hifigan.generator.CausalHiFTGenerator": "CosyVoice3",
}


class ModelLoadError(RuntimeError):
    """The model directory is missing, incomplete, corrupt or holds a different model."""


def _class_for(target: str):
    if target in OTHER_GENERATIONS:
        raise ModelLoadError(
            f"this is a {OTHER_GENERATIONS[target]} model ({target}); cosyvoice-lite runs CosyVoice-300M-SFT (v1) only")
    if target not in CLASSES:
        raise ModelLoadError(f"cosyvoice.yaml names an unsupported class {target!r}")
    module, name = CLASSES[target]
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def build(node, where: str = "config", policy: Precision = EXACT):
    """Instantiate a resolved config node with our classes; ``!name:`` nodes become plain kwargs dicts.

    ``where`` is the node's dotted path, which is also the built module's path in the model (yaml keys name the
    submodules): classes that take a ``policy`` get ``policy`` at that path."""
    if isinstance(node, New):
        if node.target == "omegaconf.DictConfig":
            return dict(node.kwargs.get("content", node.args[0] if node.args else {}))
        cls = _class_for(node.target)
        parameters = inspect.signature(cls.__init__).parameters
        kwargs = {key: build(value, f"{where}.{key}", policy) for key, value in node.kwargs.items()
                  if key in parameters and key != "policy"}
        if "policy" in parameters:
            kwargs["policy"] = policy.at(where)
        missing = [key for key, p in parameters.items()
                   if key != "self" and p.default is inspect.Parameter.empty
                   and p.kind is p.POSITIONAL_OR_KEYWORD and key not in kwargs]
        if missing:
            raise ModelLoadError(f"cosyvoice.yaml: {where} ({node.target}) lacks {', '.join(missing)}")
        return cls(**kwargs)
    if isinstance(node, Name):
        if node.target not in SAMPLERS:
            raise ModelLoadError(f"cosyvoice.yaml: {where} uses unsupported function {node.target!r}")
        return dict(node.kwargs)
    if isinstance(node, dict):
        return {key: build(value, f"{where}.{key}", policy) for key, value in node.items()}
    if isinstance(node, list):
        return [build(value, where, policy) for value in node]
    return node


def _read_checkpoint(path: Path, mmap: bool = False, register: bool = True):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        if mmap and register and isinstance(state, dict):
            register_mapping(state.values())
        return state
    except Exception as error:  # torch raises many types for truncated/corrupt archives
        raise ModelLoadError(f"{path.name} cannot be read as a torch checkpoint (truncated or corrupt download?): "
                             f"{type(error).__name__}: {error}") from error


# --- memory-mapped checkpoints ---------------------------------------------------------------------------------
# The fast modes load checkpoints with mmap and let the modules use the mapped tensors directly (no copy). Weights
# that get converted (e.g. to int8) are then released page by page with madvise(MADV_DONTNEED): the mapping is
# private and never written, so the kernel simply drops the pages (they would be re-read from the file if touched).

def load_state(module: torch.nn.Module, state: dict, filename: str, assign: bool = False) -> None:
    """Strict load with an error that names the file and the first offending keys. With ``assign`` the module
    takes the given tensors as its parameters (no copy: used with meta-device modules and mapped checkpoints)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{filename} is not a state dict of tensors")
    state = fuse_qkv_keys(module, state, on_fused=release_pages)
    own = checkpoint_form(module)  # key -> (shape, dtype); converted layers expect their nn layer's float32 keys
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {shape}" for k, (shape, _) in own.items()
                   if k in state and tuple(state[k].shape) != shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatches (e.g. {'; '.join(wrong_shape[:3])}, file vs yaml)")
    if problems:
        raise ModelLoadError(f"{filename} does not match cosyvoice.yaml: " + "; ".join(problems))
    if assign:
        state = {k: v if own[k][1] in (None, v.dtype) else v.to(own[k][1]) for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True, assign=assign)  # converted layers convert here, one by one
    except NonFiniteWeight as error:
        raise ModelLoadError(f"{filename}: {error.key} has NaN or infinite values (corrupt or badly converted "
                             "checkpoint)") from None


def read_speakers(path: Path, embed_dim: int) -> dict[str, torch.Tensor]:
    """spk2info.pt maps speaker id -> {'embedding': (1, embed_dim)}; return id -> float32 (1, embed_dim)."""
    info = _read_checkpoint(path)
    if not isinstance(info, dict) or not info:
        raise ModelLoadError(f"{path.name} holds no speakers")
    speakers = {}
    for name, entry in info.items():
        embedding = entry.get("embedding") if isinstance(entry, dict) else None
        if not isinstance(embedding, torch.Tensor) or embedding.numel() != embed_dim:
            raise ModelLoadError(f"{path.name}: speaker {name!r} has no {embed_dim}-dim 'embedding'")
        name = str(name)
        if not name or len(name) > 100 or not name.isprintable():
            raise ModelLoadError(f"{path.name}: speaker id {name[:100]!r} is empty, over 100 characters or has a "
                                 "control character: it cannot be named in a request or sent in a header")
        embedding = embedding.detach().float().reshape(1, embed_dim)
        if not torch.isfinite(embedding).all():
            raise ModelLoadError(f"{path.name}: speaker {name!r} has NaN or infinite values in its embedding")
        speakers[name] = embedding
    return speakers


def check_finite(module: torch.nn.Module, filename: str) -> None:
    """NaN or infinite weights make a model that passes every shape check and speaks silence or noise.

    Float32 tensors only: converted layers checked their float32 weights while loading them (a float16 copy may
    overflow where the float32 checkpoint did not). Each mapped tensor's pages are dropped once checked, so that a
    whole checkpoint is never resident at once."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.dtype == torch.float32 and not tensor.is_meta and not torch.isfinite(tensor).all():
            raise ModelLoadError(f"{filename}: {name} has NaN or infinite values (corrupt or badly converted "
                                 "checkpoint)")
        release_pages(tensor)


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a model file (None: a regular file). Never opens it: a FIFO would block and
    a device such as /dev/zero never ends."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as error:  # a symlink loop (ELOOP), no permission, ...
        return f"unusable: {error.strerror or error}"
    if stat.S_ISREG(mode):
        return None
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a device"),
             (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")]
    return next((f"{what}, not a file" for test, what in kinds if test(mode)), "not a regular file")


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    problems = {name: file_problem(model_dir / name) for name in MODEL_FILES}
    odd = [f"{name} is {why}" for name, why in problems.items() if why not in (None, "missing")]
    if odd:
        raise ModelLoadError(f"model directory {model_dir}: {'; '.join(odd)}")
    missing = [name for name, why in problems.items() if why == "missing" and name in REQUIRED_FILES]
    if "cosyvoice.yaml" in missing:
        for other, generation in (("cosyvoice2.yaml", "CosyVoice2"), ("cosyvoice3.yaml", "CosyVoice3")):
            if (model_dir / other).is_file():
                raise ModelLoadError(f"{model_dir} is a {generation} model directory ({other}); "
                                     "cosyvoice-lite runs CosyVoice-300M-SFT (v1) only")
    if missing:
        raise ModelLoadError(f"model directory {model_dir} is incomplete: missing {', '.join(missing)} "
                             "(fetch the model with scripts/download_model.py)")


def build_networks(config, policy: Precision = EXACT) -> tuple:
    """(llm, flow, hift, sample_rate) with untrained weights, sized by the config, their layers in the forms of
    ``policy`` (converted layers hold no weights until a checkpoint is loaded)."""
    try:
        for section in ("llm", "flow", "hift"):
            if section not in config:
                raise ModelLoadError(f"cosyvoice.yaml has no '{section}' section")
        llm = build(config["llm"], "llm", policy)
        flow = build(config["flow"], "flow", policy)
        hift = build(config["hift"], "hift", policy)
        sample_rate = int(config.get("sample_rate", 22050))
    except ConfigError as error:
        raise ModelLoadError(str(error)) from error
    except (TypeError, ValueError, NotImplementedError) as error:
        raise ModelLoadError(f"cosyvoice.yaml describes a model this code cannot build: {error}") from error
    # The flow's mel frame rate is the vocoder's: sample_rate / (samples per mel frame).
    flow.sample_rate, flow.hop_size = sample_rate, hift.upsample_factor
    return llm, flow, hift, sample_rate


def checked_config(model_dir: Path):
    """The parsed ``cosyvoice.yaml`` of a model directory that has every checkpoint file; ModelLoadError if not."""
    check_model_dir(model_dir)
    try:
        return read_config(model_dir / "cosyvoice.yaml")
    except ConfigError as error:
        raise ModelLoadError(str(error)) from error


def load_model(model_dir: str | Path, mode: str = "exact", external: tuple = ()):
    """Load an official CosyVoice-300M(-SFT, -Instruct) directory into our networks; see ``CosyVoiceSFT``. Without
    spk2info.pt (the base model) the model has no speakers of its own.

    ``mode`` is a speed mode of ``speed.py``: 'exact' (float32, the default here), 'default' or 'fast'. The
    networks are built in the mode's form (``precision.Precision``). The non-exact modes build them without
    weights, map the checkpoints into memory and convert them layer by layer while loading, so the process never
    holds all float32 weights at once. ``external``: module paths an execution backend will run instead
    (``Precision.external``): built in float32 and, in the lean modes, left in the file mapping, never read.
    """

    target = mode_settings(mode)
    lean = target.name != "exact"
    model_dir = Path(model_dir)
    config = checked_config(model_dir)
    policy = Precision.of(target, external=external if lean else ())
    if lean:
        with torch.device("meta"):
            llm, flow, hift, sample_rate = build_networks(config, policy)
    else:
        llm, flow, hift, sample_rate = build_networks(config, policy)
    hift.body_window = target.hift_window or None
    load_state(llm, _read_checkpoint(model_dir / "llm.pt", mmap=lean), "llm.pt", assign=lean)
    check_finite(llm, "llm.pt")
    if lean:  # the LLM's own copies before the other files are mapped: the peak stays one network's worth lower
        copied = copy_out_of_mappings(llm)
    load_state(flow, _read_checkpoint(model_dir / "flow.pt", mmap=lean), "flow.pt", assign=lean)
    raw_hift = _read_checkpoint(model_dir / "hift.pt", mmap=lean)
    try:
        hift_state = normalize_hift_state_dict(raw_hift)
    except ValueError as error:
        raise ModelLoadError(f"hift.pt: {error}") from error
    kept = {id(t) for t in hift_state.values()}
    for tensor in raw_hift.values():  # weight-norm parts folded into new tensors: their mapped pages can go
        if id(tensor) not in kept:
            release_pages(tensor)
    del raw_hift
    load_state(hift, hift_state, "hift.pt", assign=lean)
    speakers = read_speakers(model_dir / SPEAKERS_FILE, flow.spk_embed_affine_layer.in_features) \
        if file_problem(model_dir / SPEAKERS_FILE) is None else {}  # missing (checked_config refused the rest)
    for module, filename in ((flow, "flow.pt"), (hift, "hift.pt")):
        check_finite(module, filename)
    for module in (llm, flow, hift):
        module.eval().requires_grad_(False)
        if lean:
            left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
            if left:
                raise ModelLoadError(f"internal: tensors left without data after loading: {', '.join(left[:3])}")
    log.info("loaded %s (%s mode): %d speakers, llm %.1fM, flow %.1fM, hift %.1fM parameters", model_dir,
             target.name, len(speakers),
             *(sum(p.numel() for p in m.parameters()) / 1e6 for m in (llm, flow, hift)))
    model = CosyVoiceSFT(llm, flow, hift, speakers, sample_rate=sample_rate, model_dir=model_dir, mode=target,
                         external=policy.external)
    if lean:
        for name, network in (("flow", flow), ("hift", hift)):  # what the backend replaces stays mapped, unread
            external = [network.get_submodule(path[len(name) + 1:]) for path in policy.external
                        if path.startswith(name + ".")]
            copied += copy_out_of_mappings(network, external)
        clear_mappings()  # only the external modules still refer to a mapping, until the backend replaces them
        log.info("%.0f MB of unconverted tensors copied out of the checkpoint mappings", copied / 2 ** 20)
    return model


def load_float32_network(model_dir: str | Path, name: str) -> torch.nn.Module:
    """One network ('llm', 'flow' or 'hift') in float32 as the checkpoint defines it, its weights memory-mapped
    from the file (for tools that derive other forms of it, e.g. an execution backend's converter)."""
    model_dir = Path(model_dir)
    config = checked_config(model_dir)
    with torch.device("meta"):
        networks = dict(zip(("llm", "flow", "hift"), build_networks(config)[:3]))
    module = networks[name]
    # not registered as a mapping: nothing here releases pages, and the registry is the serving model's
    state = _read_checkpoint(model_dir / f"{name}.pt", mmap=True, register=False)
    if name == "hift":
        try:
            state = normalize_hift_state_dict(state)
        except ValueError as error:
            raise ModelLoadError(f"hift.pt: {error}") from error
    load_state(module, state, f"{name}.pt", assign=True)
    return module.eval().requires_grad_(False)
