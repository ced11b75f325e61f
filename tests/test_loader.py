"""load_model reads official model directories strictly and explains every way a directory can be wrong."""
import shutil
from pathlib import Path

import pytest
import torch
from conftest import edit_checkpoint
from golden_data import GOLDEN_MODEL
from random_model import write_random_model

from cosyvoice_lite.decode.reference import synthesize
from cosyvoice_lite.model import ModelLoadError, load_model
from cosyvoice_lite.model.config import ConfigError, read_config

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_FILES = ["cosyvoice.yaml", "llm.pt", "flow.pt", "hift.pt"]
MODEL_FILES = [*REQUIRED_FILES, "spk2info.pt"]


@pytest.fixture
def model_copy(tmp_path):
    """A writable copy of the golden model directory."""
    assert GOLDEN_MODEL.is_dir(), f"golden model missing at {GOLDEN_MODEL}"
    for name in MODEL_FILES:
        shutil.copy(GOLDEN_MODEL / name, tmp_path / name)
    return tmp_path


def test_golden_model_loads_with_its_seven_speakers():
    model = load_model(GOLDEN_MODEL)
    assert list(model.speakers) == ["中文女", "中文男", "日语男", "粤语女", "英文女", "英文男", "韩语女"]
    assert model.sample_rate == 22050 and model.samples_per_frame == 256 and model.token_rate == 50


@pytest.mark.parametrize("mode", ["default", "fast"])
def test_lean_modes_keep_no_checkpoint_mapped_after_loading(model_copy, mode):
    model = load_model(model_copy, mode=mode)  # the lean modes map the checkpoints while converting them
    mapped = Path("/proc/self/maps").read_text()
    assert str(model_copy) not in mapped
    assert synthesize(model, [1, 2, 3], next(iter(model.speakers)), seed=0).numel() > 0


def test_sizes_come_from_the_yaml():
    model = load_model(GOLDEN_MODEL)
    assert model.llm.llm_decoder.in_features == 128          # llm_output_size of the tiny yaml
    assert model.flow.input_embedding.embedding_dim == 64    # flow input_size
    assert model.hift.conv_pre.out_channels == 32            # base_channels


@pytest.mark.parametrize("missing", REQUIRED_FILES)
def test_missing_file_is_named(model_copy, missing):
    (model_copy / missing).unlink()
    with pytest.raises(ModelLoadError, match=f"missing {missing}"):
        load_model(model_copy)


def test_a_directory_without_spk2info_is_the_base_model_with_no_speakers_of_its_own(model_copy):
    (model_copy / "spk2info.pt").unlink()  # the official CosyVoice-300M directory ships none
    model = load_model(model_copy, mode="fast")
    assert model.speakers == {}


def test_a_spk2info_that_is_not_a_file_is_still_refused(model_copy):
    (model_copy / "spk2info.pt").unlink()
    (model_copy / "spk2info.pt").mkdir()
    with pytest.raises(ModelLoadError, match="spk2info.pt is a directory"):
        load_model(model_copy)


def test_nonexistent_directory_is_reported(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_truncated_checkpoint_is_named(model_copy):
    data = (model_copy / "flow.pt").read_bytes()
    (model_copy / "flow.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="flow.pt cannot be read"):
        load_model(model_copy)


def test_random_bytes_instead_of_a_checkpoint_are_named(model_copy):
    (model_copy / "llm.pt").write_bytes(b"not a checkpoint at all" * 100)
    with pytest.raises(ModelLoadError, match="llm.pt cannot be read"):
        load_model(model_copy)


# The lean modes build converted layers (int8, float16, time-major) that load the same official float32 keys:
# a wrong checkpoint is reported the same way in every mode.
MODES = ["exact", "default", "fast"]


@pytest.mark.parametrize("mode", MODES)
def test_missing_key_is_named(model_copy, mode):
    edit_checkpoint(model_copy / "llm.pt", lambda state: state.pop("llm_decoder.bias"))  # float16 when lean
    with pytest.raises(ModelLoadError, match=r"llm.pt .*missing keys \(e.g. llm_decoder.bias\)"):
        load_model(model_copy, mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_unexpected_key_is_named(model_copy, mode):
    edit_checkpoint(model_copy / "flow.pt", lambda state: state.update({
        "extra.weight": torch.zeros(1),
        "decoder.estimator.final_proj.scale": torch.zeros(1)}))  # below a time-major conv of the lean modes
    with pytest.raises(ModelLoadError, match=r"flow.pt .*2 unexpected keys \(e.g. extra.weight, "
                                             r"decoder.estimator.final_proj.scale\)"):
        load_model(model_copy, mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_of_another_size_reports_shape_mismatch(model_copy, tmp_path_factory, mode):
    other = write_random_model(tmp_path_factory.mktemp("tiny"), "tiny")
    shutil.copy(other / "flow.pt", model_copy / "flow.pt")
    with pytest.raises(ModelLoadError, match="flow.pt does not match cosyvoice.yaml.*shape mismatches"):
        load_model(model_copy, mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key", ["llm.encoders.0.feed_forward.w_1.weight", "text_embedding.weight",
                                 "llm_decoder.bias", "spk_embed_affine_layer.weight"])
def test_non_finite_llm_weight_is_named(model_copy, mode, key):
    """Whether the layer is float32, int8 or float16 in the mode: the float32 checkpoint value is checked."""
    def poison(state):
        state[key] = state[key].clone()
        state[key].view(-1)[1] = float("inf")

    edit_checkpoint(model_copy / "llm.pt", poison)
    with pytest.raises(ModelLoadError, match=f"llm.pt: {key} has NaN or infinite values"):
        load_model(model_copy, mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_a_float32_weight_beyond_the_float16_range_still_loads(model_copy, mode):
    def enlarge(state):
        state["text_embedding.weight"] = state["text_embedding.weight"].clone()
        state["text_embedding.weight"][0, 0] = 1e5  # overflows the lean modes' float16 table; valid in float32

    edit_checkpoint(model_copy / "llm.pt", enlarge)
    assert load_model(model_copy, mode=mode).mode.name == mode


def test_cosyvoice2_directory_is_recognised(tmp_path):
    (tmp_path / "cosyvoice2.yaml").write_text("llm: !new:cosyvoice.llm.llm.Qwen2LM\n    llm_input_size: 896\n")
    for name in ["llm.pt", "flow.pt", "hift.pt", "spk2info.pt"]:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ModelLoadError, match="CosyVoice2"):
        load_model(tmp_path)


def test_cosyvoice2_classes_in_cosyvoice_yaml_are_recognised(model_copy):
    text = (model_copy / "cosyvoice.yaml").read_text()
    (model_copy / "cosyvoice.yaml").write_text(text.replace("cosyvoice.llm.llm.TransformerLM", "cosyvoice.llm.llm.Qwen2LM"))
    with pytest.raises(ModelLoadError, match="CosyVoice2 model"):
        load_model(model_copy)


def test_invalid_yaml_is_reported(model_copy):
    (model_copy / "cosyvoice.yaml").write_text("llm: [unclosed\n")
    with pytest.raises(ModelLoadError, match="not valid YAML"):
        load_model(model_copy)


def test_bad_speaker_file_is_reported(model_copy):
    torch.save({"x": {"no_embedding": torch.zeros(1)}}, model_copy / "spk2info.pt")
    with pytest.raises(ModelLoadError, match="speaker 'x' has no 192-dim 'embedding'"):
        load_model(model_copy)


def test_config_resolves_refs_arithmetic_and_yaml12_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 4\nb: !ref <a> * 3\nnest:\n  x: 1e-06\n  y: !ref <nest.x>\nc: !ref <b> // <a>\n")
    config = read_config(path)
    assert (config["b"], config["nest"]["y"], config["c"]) == (12, 1e-06, 3)


def test_config_rejects_a_dangling_ref(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: !ref <nowhere>\n")
    with pytest.raises(ConfigError, match="points at nothing"):
        read_config(path)["a"]


def test_tiny_random_model_loads_and_speaks(tmp_path):
    model = load_model(write_random_model(tmp_path, "tiny", seed=3))
    wav = synthesize(model, [1, 2, 3], "英文女", seed=0)
    assert wav.shape[0] == 1 and wav.shape[1] > 0 and wav.shape[1] % 256 == 0
    assert wav.abs().max() <= 0.99 and wav.abs().max() > 0.01


def test_same_seed_gives_the_same_waveform():
    model = load_model(GOLDEN_MODEL)
    a = synthesize(model, [100, 200, 300], "中文女", seed=7, max_token_text_ratio=5)
    b = synthesize(model, [100, 200, 300], "中文女", seed=7, max_token_text_ratio=5)
    assert torch.equal(a, b)


def test_unknown_speaker_lists_the_known_ones():
    model = load_model(GOLDEN_MODEL)
    with pytest.raises(KeyError, match="known: 中文女, 中文男"):
        model.embedding("nobody")


def test_a_model_copy_has_the_fingerprint_of_its_original_and_a_changed_file_does_not(tmp_path, tiny_model_dir):
    import shutil

    from cosyvoice_lite.model.fingerprint import model_fingerprint

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert model_fingerprint(copy) == model_fingerprint(tiny_model_dir)
    with open(copy / "spk2info.pt", "ab") as f:
        f.write(b"\0")
    assert model_fingerprint(copy) != model_fingerprint(tiny_model_dir)
    assert model_fingerprint(copy, ("flow.pt",)) == model_fingerprint(tiny_model_dir, ("flow.pt",))


def test_a_model_without_spk2info_has_a_fingerprint_of_its_own(tmp_path, tiny_model_dir):
    from cosyvoice_lite.model.fingerprint import model_fingerprint

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "spk2info.pt").unlink()
    assert model_fingerprint(shutil.copytree(base, tmp_path / "copy")) == model_fingerprint(base)
    assert model_fingerprint(base) != model_fingerprint(tiny_model_dir)
    assert model_fingerprint(base, ("flow.pt",)) == model_fingerprint(tiny_model_dir, ("flow.pt",))


# ---- the text embedding of the lean modes, read from llm.pt at each lookup -------------------------------------

TEXT_IDS = torch.tensor([[0, 5, 5, 17, 3]])


@pytest.mark.parametrize("mode", ["default", "fast"])
@pytest.mark.parametrize("network, table", [("llm", "text_embedding"), ("llm", "speech_embedding"),
                                            ("flow", "input_embedding")])
def test_lean_modes_look_up_the_checkpoints_float32_embeddings(model_copy, mode, network, table):
    rows_of = torch.load(model_copy / f"{network}.pt", weights_only=True)[f"{table}.weight"]
    with torch.inference_mode():
        rows = getattr(getattr(load_model(model_copy, mode=mode), network), table)(TEXT_IDS)
    assert rows.dtype == torch.float32 and torch.equal(rows, rows_of[TEXT_IDS])


def test_a_checkpoint_replaced_by_a_new_file_leaves_the_loaded_model_unchanged(model_copy):
    model = load_model(model_copy, mode="default")
    with torch.inference_mode():
        before = model.llm.text_embedding(TEXT_IDS)
    other = write_random_model(model_copy.parent / "other", "tiny")
    (other / "llm.pt").replace(model_copy / "llm.pt")  # as a download does: a new file renamed over the old
    with torch.inference_mode():
        assert torch.equal(model.llm.text_embedding(TEXT_IDS), before)


def test_a_checkpoint_overwritten_in_place_after_loading_is_reported(model_copy):
    model = load_model(model_copy, mode="default")
    data = (model_copy / "llm.pt").read_bytes()
    with open(model_copy / "llm.pt", "r+b") as f:  # same file, new content (e.g. `cp` over it)
        f.truncate(len(data) // 2)
    with pytest.raises(RuntimeError, match="llm.pt changed on disk after it was loaded.*restart"):
        model.llm.text_embedding(TEXT_IDS)
