"""Random-weight emotion2vec checkpoints in FunASR's own directory layout.

For tests and benchmarks only: these models have the real architecture and the real
speed, and know nothing about emotions. A head set by hand (``head_probs``) makes every
clip score exactly those probabilities, which is how escalation is tested end to end.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from pathlib import Path

import torch
import yaml

TEST_CHECKPOINT_KEY = "test_checkpoint"  # in config.yaml; read by emotion.engine.model
TOKENS = ["生气/angry", "厌恶/disgusted", "恐惧/fearful", "开心/happy", "中立/neutral", "其他/other", "难过/sad", "吃惊/surprised", "<unk>"]

# Sizes of the released models: plus_large is ~162 M parameters, plus_base ~93 M.
SIZES = {
    "tiny": {"embed_dim": 32, "num_heads": 2, "depth": 1, "prenet_depth": 1, "channels": 32, "conv_pos_groups": 4, "mlp_ratio": 2.0},
    "base": {"embed_dim": 768, "num_heads": 12, "depth": 8, "prenet_depth": 4, "channels": 512, "conv_pos_groups": 16, "mlp_ratio": 4.0},
    "large": {"embed_dim": 1024, "num_heads": 16, "depth": 8, "prenet_depth": 4, "channels": 512, "conv_pos_groups": 16, "mlp_ratio": 4.0},
}


def model_config(size: str = "tiny") -> dict:
    s = SIZES[size]
    c = s["channels"]
    return {
        "model": "Emotion2vec",
        "model_conf": {
            "loss_beta": 0.0, "loss_scale": None, "depth": s["depth"], "start_drop_path_rate": 0.0,
            "end_drop_path_rate": 0.0, "num_heads": s["num_heads"], "norm_eps": 1e-05, "norm_affine": True,
            "encoder_dropout": 0.1, "post_mlp_drop": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0,
            "dropout_input": 0.0, "layerdrop": 0.0, "embed_dim": s["embed_dim"], "mlp_ratio": s["mlp_ratio"],
            "layer_norm_first": False, "average_top_k_layers": s["depth"], "end_of_block_targets": False,
            "clone_batch": 1, "normalize": True,
            "modalities": {
                "audio": {
                    "type": "AUDIO", "prenet_depth": s["prenet_depth"], "prenet_layerdrop": 0.0, "prenet_dropout": 0.1,
                    "start_drop_path_rate": 0.0, "end_drop_path_rate": 0.0, "num_extra_tokens": 10,
                    "init_extra_token_zero": False, "mask_noise_std": 0.01, "mask_prob_min": None, "mask_prob": 0.5,
                    "inverse_mask": False, "mask_prob_adjust": 0.05, "keep_masked_pct": 0.0, "mask_length": 5,
                    "add_masks": False, "remove_masks": False, "mask_dropout": 0.0, "encoder_zero_mask": True,
                    "mask_channel_prob": 0.0, "mask_channel_length": 64, "ema_local_encoder": False,
                    "local_grad_mult": 1.0, "use_alibi_encoder": True, "alibi_scale": 1.0, "learned_alibi": False,
                    "alibi_max_pos": None, "learned_alibi_scale": True, "learned_alibi_scale_per_head": True,
                    "learned_alibi_scale_per_layer": False, "num_alibi_heads": s["num_heads"],
                    "model_depth": s["depth"], "decoder": None, "extractor_mode": "layer_norm",
                    "feature_encoder_spec": f"[({c}, 10, 5)] + [({c}, 3, 2)] * 4 + [({c},2,2)] + [({c},2,2)]",
                    "conv_pos_width": 95, "conv_pos_groups": s["conv_pos_groups"], "conv_pos_depth": 5,
                    "conv_pos_pre_ln": False,
                }
            },
        },
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
    }


def write_checkpoint(
    directory: str | Path,
    *,
    size: str = "tiny",
    tokens: list[str] | None = None,
    head_probs: dict[str, float] | None = None,
    seed: int = 0,
) -> Path:
    """Write config.yaml, model.pt and tokens.txt, as FunASR's hubs ship them."""
    with contextlib.redirect_stdout(sys.stderr):  # FunASR prints a banner on import; stdout is the caller's
        from funasr.models.emotion2vec.model import Emotion2vec

    tokens = list(tokens or TOKENS)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model_config(size)
    torch.manual_seed(seed)
    net = Emotion2vec(model_conf=copy.deepcopy(config["model_conf"]), vocab_size=len(tokens))
    with torch.no_grad():
        # Spread the ALiBi scales and biases so a random model is not degenerate.
        for name, p in net.named_parameters():
            if name.endswith("alibi_scale"):
                p.uniform_(0.5, 1.5)
        if head_probs is not None:
            net.proj.weight.zero_()
            net.proj.bias.copy_(head_bias(tokens, head_probs))
    torch.save(net.state_dict(), directory / "model.pt")
    # The model loader reports this key (/ready's ``test_checkpoint``), so that nobody takes
    # these scores for a real model's; FunASR passes unknown keys by.
    config[TEST_CHECKPOINT_KEY] = {"random_weights": True, "head": head_probs, "seed": seed}
    (directory / "config.yaml").write_text(
        "# Written by `python -m emotion make-checkpoint`: random weights, for tests and benchmarks only.\n"
        + yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    (directory / "tokens.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return directory


def head_bias(tokens: list[str], probs: dict[str, float]) -> torch.Tensor:
    """Logits whose softmax is ``probs`` (English labels); the rest share what is left."""
    from emotion.engine.model import english_label

    labels = [english_label(t) for t in tokens]
    unknown = [k for k in probs if k not in labels]
    if unknown:
        raise ValueError(f"labels {unknown} not in {labels}")
    rest = [lab for lab in labels if lab not in probs]
    left = 1.0 - sum(probs.values())
    if left < -1e-9 or (rest and left <= 0):
        raise ValueError("head_probs must sum to at most 1 (less than 1 when labels are left out)")
    share = left / len(rest) if rest else 0.0
    return torch.tensor([math.log(probs.get(lab, share)) for lab in labels])
