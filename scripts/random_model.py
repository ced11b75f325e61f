"""Random-weight CosyVoice v1 models in the official layout, built by our own code.

``write_random_model(dir, "tiny")`` gives the service and its tests a real model directory (cosyvoice.yaml, llm.pt,
flow.pt, hift.pt, spk2info.pt) that loads in a second and speaks noise; ``build_random_model("full")`` gives the
full-size CosyVoice-300M architecture in memory for benchmarks (no download needed).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml

from cosyvoice_lite.model.config import Config, _Loader
from cosyvoice_lite.model.loader import build_networks
from cosyvoice_lite.model.transformer import split_qkv_keys

SPEAKERS = ["中文女", "中文男", "日语男", "粤语女", "英文女", "英文男", "韩语女"]

YAML = """\
# Random-weight CosyVoice v1 model ({preset} sizes) written by cosyvoice-lite (scripts/random_model.py).
# Official class names, tags and keys.
__set_seed1: !apply:random.seed [{seed}]
__set_seed3: !apply:torch.manual_seed [{seed}]

sample_rate: 22050
text_encoder_input_size: {text_in}
llm_input_size: {llm_d}
llm_output_size: {llm_d}
spk_embed_dim: 192

llm: !new:cosyvoice.llm.llm.TransformerLM
    text_encoder_input_size: !ref <text_encoder_input_size>
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    text_token_size: 51866
    speech_token_size: 4096
    length_normalized_loss: True
    lsm_weight: 0
    spk_embed_dim: !ref <spk_embed_dim>
    text_encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        input_size: !ref <text_encoder_input_size>
        output_size: {llm_d}
        attention_heads: {llm_heads}
        linear_units: {llm_ffn}
        num_blocks: {text_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.0
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        use_cnn_module: False
        macaron_style: False
        use_dynamic_chunk: False
        use_dynamic_left_chunk: False
        static_chunk_size: 1
    llm: !new:cosyvoice.transformer.encoder.TransformerEncoder
        input_size: !ref <llm_input_size>
        output_size: !ref <llm_output_size>
        attention_heads: {llm_heads}
        linear_units: {llm_ffn}
        num_blocks: {lm_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.0
        input_layer: 'linear_legacy'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        static_chunk_size: 1
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: {flow_d}
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 4096
    input_frame_rate: 50
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        output_size: {flow_d}
        attention_heads: {flow_heads}
        linear_units: {flow_ffn}
        num_blocks: {flow_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: {flow_d}
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 80
        sampling_ratios: [1, 1, 1, 1]
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: {est_channels}
            dropout: 0.0
            attention_head_dim: {est_head_dim}
            n_blocks: {est_blocks}
            num_mid_blocks: {est_mid_blocks}
            num_heads: {est_heads}
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {hift_channels}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 8]
    upsample_kernel_sizes: [16, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: {hift_kernels}
    resblock_dilation_sizes: {hift_dilations}
    source_resblock_kernel_sizes: [7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {f0_channels}

get_tokenizer: !name:whisper.tokenizer.get_tokenizer
    multilingual: True
    num_languages: 100
    language: 'en'
    task: 'transcribe'
allowed_special: 'all'
"""


# Layer sizes. "full" is the CosyVoice-300M architecture (the official v1 recipe's sizes); "tiny" shrinks every
# width and depth so that tests run the real code in seconds.
PRESETS = {
    "full": dict(text_in=512, llm_d=1024, llm_heads=16, llm_ffn=4096, text_blocks=6, lm_blocks=14,
                 flow_d=512, flow_heads=8, flow_ffn=2048, flow_blocks=6,
                 est_channels=[256, 256], est_head_dim=64, est_blocks=4, est_mid_blocks=12, est_heads=8,
                 hift_channels=512, hift_kernels=[3, 7, 11], hift_dilations=[[1, 3, 5]] * 3, f0_channels=512),
    "tiny": dict(text_in=16, llm_d=64, llm_heads=2, llm_ffn=128, text_blocks=1, lm_blocks=2,
                 flow_d=32, flow_heads=2, flow_ffn=64, flow_blocks=1,
                 est_channels=[16], est_head_dim=8, est_blocks=1, est_mid_blocks=1, est_heads=2,
                 hift_channels=16, hift_kernels=[3, 7], hift_dilations=[[1, 3, 5]] * 2, f0_channels=16),
}


# hift.pt stores weight-normed convolutions in the legacy (weight_g, weight_v) form, as the official files do.
WEIGHT_NORMED = re.compile(r"^(conv_pre|conv_post|ups\.\d+|(source_)?resblocks\.\d+\.convs[12]\.\d+|"
                           r"f0_predictor\.condnet\.\d+)\.weight$")


def legacy_weight_norm(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if WEIGHT_NORMED.match(key):
            base = key[: -len("weight")]
            norm = value.flatten(1).norm(dim=1).reshape(-1, *[1] * (value.dim() - 1))
            out[base + "weight_g"] = norm.clone()
            out[base + "weight_v"] = value.clone()
        else:
            out[key] = value
    return out


def build_random_model(preset: str = "tiny", seed: int = 0):
    """(yaml text, llm, flow, hift) with random weights, built by our own loader from our own yaml."""
    text = YAML.format(seed=seed, preset=preset, **PRESETS[preset])
    config = Config(yaml.load(text, Loader=_Loader), f"<{preset} preset>")
    torch.manual_seed(seed)
    llm, flow, hift, _ = build_networks(config)
    with torch.no_grad():
        # Random init leaves the F0 predictor near 0 Hz (all unvoiced noise) and the speech head flat;
        # give both some range so the waveform has voiced parts and tokens vary.
        hift.f0_predictor.classifier.weight.normal_(0.0, 30.0)
        hift.f0_predictor.classifier.bias.fill_(120.0)
        llm.llm_decoder.weight.mul_(4.0)
    return text, llm, flow, hift


def write_random_model(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a model directory in the official layout (hift.pt with legacy weight-norm keys)."""
    text, llm, flow, hift = build_random_model(preset, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cosyvoice.yaml").write_text(text, encoding="utf-8")
    torch.save(split_qkv_keys(llm, llm.state_dict()), out_dir / "llm.pt")
    torch.save(split_qkv_keys(flow, flow.state_dict()), out_dir / "flow.pt")
    torch.save(legacy_weight_norm(hift.state_dict()), out_dir / "hift.pt")
    generator = torch.Generator().manual_seed(seed + 1)
    speakers = {name: {"embedding": torch.randn(1, 192, generator=generator)} for name in SPEAKERS}
    torch.save(speakers, out_dir / "spk2info.pt")
    return out_dir
