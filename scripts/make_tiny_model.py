#!/usr/bin/env python3
"""Write a small random-weight model directory in the official CosyVoice-300M-SFT layout.

The directory (cosyvoice.yaml, llm.pt, flow.pt, hift.pt, spk2info.pt) has the real architecture and fixed sizes
(text vocabulary, 4096 speech tokens, 80 mel bins, 192-dim speaker embeddings, 22050 Hz) with every layer
shrunk, so the service and its tests run the real code path in seconds. It speaks noise, not words.

    python scripts/make_tiny_model.py models/tiny [--seed 0]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cosyvoice_lite.model.config import read_config  # noqa: E402
from cosyvoice_lite.model.loader import build  # noqa: E402

SPEAKERS = ["中文女", "中文男", "日语男", "粤语女", "英文女", "英文男", "韩语女"]

YAML = """\
# Tiny random-weight CosyVoice v1 model written by cosyvoice-lite's scripts/make_tiny_model.py.
# Official class names, tags and keys; every width and depth shrunk.
__set_seed1: !apply:random.seed [{seed}]
__set_seed3: !apply:torch.manual_seed [{seed}]

sample_rate: 22050
text_encoder_input_size: 16
llm_input_size: 64
llm_output_size: 64
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
        output_size: 64
        attention_heads: 2
        linear_units: 128
        num_blocks: 1
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
        attention_heads: 2
        linear_units: 128
        num_blocks: 2
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
    input_size: 32
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 4096
    input_frame_rate: 50
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        output_size: 32
        attention_heads: 2
        linear_units: 64
        num_blocks: 1
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 32
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
            channels: [16]
            dropout: 0.0
            attention_head_dim: 8
            n_blocks: 1
            num_mid_blocks: 1
            num_heads: 2
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: 16
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
    resblock_kernel_sizes: [3, 7]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 16

get_tokenizer: !name:whisper.tokenizer.get_tokenizer
    multilingual: True
    num_languages: 100
    language: 'en'
    task: 'transcribe'
allowed_special: 'all'
"""

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


def make_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cosyvoice.yaml").write_text(YAML.format(seed=seed), encoding="utf-8")
    config = read_config(out_dir / "cosyvoice.yaml")
    torch.manual_seed(seed)
    llm, flow, hift = (build(config[name], name) for name in ("llm", "flow", "hift"))
    with torch.no_grad():
        # Random init leaves the F0 predictor near 0 Hz (all unvoiced noise) and the speech head flat;
        # give both some range so the waveform has voiced parts and tokens vary.
        hift.f0_predictor.classifier.weight.normal_(0.0, 30.0)
        hift.f0_predictor.classifier.bias.fill_(120.0)
        llm.llm_decoder.weight.mul_(4.0)
    torch.save(llm.state_dict(), out_dir / "llm.pt")
    torch.save(flow.state_dict(), out_dir / "flow.pt")
    torch.save(legacy_weight_norm(hift.state_dict()), out_dir / "hift.pt")
    generator = torch.Generator().manual_seed(seed + 1)
    speakers = {name: {"embedding": torch.randn(1, 192, generator=generator)} for name in SPEAKERS}
    torch.save(speakers, out_dir / "spk2info.pt")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write (created if needed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = make_tiny_model(args.out_dir, args.seed)
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in sorted(path.iterdir()))
    print(f"wrote {path}: {sizes}")


if __name__ == "__main__":
    main()
