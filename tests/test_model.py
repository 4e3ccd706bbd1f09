"""emotion2vec through FunASR: loading, labels, exact batched inference, refusing bad checkpoints."""

import numpy as np
import pytest
import torch
from conftest import speech_like

from emotion.checkpoint import head_bias, write_checkpoint
from emotion.config import LABELS
from emotion.errors import ModelUnavailable
from emotion.model import EmotionModel, english_label, use_flex_attention

LENGTHS_S = [0.5, 0.9, 1.7, 3.2, 7.5, 15.0, 30.0]


@pytest.fixture(scope="module")
def model(tiny_model):
    return EmotionModel(str(tiny_model), device="cpu")


def funasr_scores(model, wave):
    """FunASR's own AutoModel.generate(), one clip per call: the reference."""
    out = model.funasr.generate(input=wave, granularity="utterance", extract_embedding=False, disable_pbar=True)[0]
    return [english_label(t) for t in out["labels"]], np.array(out["scores"])


def test_loads_funasr_layout_with_english_labels(model):
    assert model.labels == list(LABELS)
    assert model.device.type == "cpu" and model.dtype == torch.float32


def test_batched_scores_equal_funasr_generate_per_clip(model):
    waves = [speech_like(s, seed=i) for i, s in enumerate(LENGTHS_S)]
    batched = model.forward(waves)
    for wave, out in zip(waves, batched):
        labels, reference = funasr_scores(model, wave)
        assert labels == model.labels
        assert np.abs(out.probs - reference).max() < 1e-4
    # Alone, each clip gives the same answer as in the batch.
    for wave, out in zip(waves, batched):
        assert np.abs(model.forward([wave])[0].probs - out.probs).max() < 1e-5


def test_without_the_padding_fix_a_padded_batch_drifts(model, tiny_model):
    """The positional-convolution leak is real: the hooks are what make batches exact."""
    plain = EmotionModel(str(tiny_model), device="cpu")
    for module in plain.net.modules():
        module._forward_pre_hooks.clear()
    short, long = speech_like(0.6, seed=1), speech_like(6.0, seed=2)
    alone = plain.forward([short], embeddings=True)[0].embedding
    padded = plain.forward([short, long], embeddings=True)[0].embedding
    fixed = model.forward([short, long], embeddings=True)[0].embedding
    assert np.abs(alone - padded).max() > 1e-3
    assert np.abs(alone - fixed).max() < 1e-4


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_scores_equal_funasr_generate(model, tiny_model):
    """The attention that the GPU path compiles, run here unfused: same scores as FunASR's own."""
    flex = EmotionModel(str(tiny_model), device="cpu", compile="off")
    assert len(use_flex_attention(flex.net)) == 2  # the prenet block and the main block
    waves = [speech_like(s, seed=i) for i, s in enumerate(LENGTHS_S[:5])]
    for wave, out in zip(waves, flex.forward(waves)):
        assert np.abs(out.probs - funasr_scores(model, wave)[1]).max() < 1e-4


def test_alibi_cache_holds_one_row_whatever_the_batch(model):
    model.forward([speech_like(s, seed=i) for i, s in enumerate([2.0, 4.0, 6.0, 8.0])])
    heads = model.net.modality_encoders["AUDIO"].modality_cfg.num_alibi_heads
    cache = list(model.net.alibi_biases.values())
    assert cache and all(t.shape[0] == heads for t in cache)


def test_embeddings_and_frames(model):
    out = model.forward([speech_like(1.0), speech_like(2.0)], frames=True, embeddings=True)
    assert out[0].embedding.shape == (model.embed_dim,)
    assert out[0].frames == 49 and out[1].frames == 99  # 20 ms hop, 25 ms receptive field
    assert out[1].frame_probs.shape == (99, 9)
    assert out[1].frame_embeddings.shape == (99, model.embed_dim)
    # The head is linear: the mean of the frame embeddings scores as the utterance.
    assert np.abs(model.head.probs(out[1].frame_embeddings.mean(0)) - out[1].probs).max() < 1e-5


def test_hand_set_head_gives_exact_scores(models):
    model = EmotionModel(str(models("angry90", angry=0.9)), device="cpu")
    for wave in (speech_like(1.0), np.zeros(16000, np.float32), speech_like(12.0, seed=3)):
        probs = model.forward([wave])[0].probs
        assert probs[0] == pytest.approx(0.9, abs=1e-6)
        assert probs[1:] == pytest.approx([0.1 / 8] * 8, abs=1e-6)


def test_checkpoint_with_its_own_label_set(tmp_path):
    tokens = ["生气/angry", "开心/happy", "中立/neutral", "难过/sad", "unuse_1", "<unk>"]
    write_checkpoint(tmp_path, tokens=tokens)
    model = EmotionModel(str(tmp_path), device="cpu")
    assert model.labels == ["angry", "happy", "neutral", "sad", "unknown"]  # FunASR hides 'unuse*'
    probs = model.forward([speech_like(1.0)])[0].probs
    assert probs.shape == (5,) and probs.sum() == pytest.approx(1.0, abs=1e-6)
    labels, reference = funasr_scores(model, speech_like(1.0))
    assert labels == model.labels and np.abs(reference - probs).max() < 1e-4


def test_checkpoint_that_does_not_match_its_config_is_refused(tmp_path, tiny_model):
    write_checkpoint(tmp_path)
    state = torch.load(tmp_path / "model.pt")
    state["proj.weight"] = torch.zeros(9, 16)  # wrong width
    del state["blocks.0.attn.qkv.weight"]
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(ModelUnavailable, match=r"does not match.*blocks\.0\.attn\.qkv\.weight \(missing\).*|proj\.weight"):
        EmotionModel(str(tmp_path), device="cpu")


@pytest.mark.parametrize("damage", ["missing_dir", "no_config", "corrupt_weights", "empty_weights"])
def test_broken_model_directories_are_refused(tmp_path, damage):
    target = tmp_path / "m"
    if damage != "missing_dir":
        write_checkpoint(target)
    if damage == "no_config":
        (target / "config.yaml").unlink()
    if damage == "corrupt_weights":
        (target / "model.pt").write_bytes(b"\x00garbage" * 100)
    if damage == "empty_weights":
        (target / "model.pt").write_bytes(b"")
    with pytest.raises(ModelUnavailable):
        EmotionModel(str(target) if damage != "missing_dir" else str(tmp_path / "nope" / "m"), device="cpu")


def test_cuda_asked_for_without_a_gpu_is_a_clear_error(tiny_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the error path cannot happen here")
    with pytest.raises(ModelUnavailable, match="no CUDA GPU"):
        EmotionModel(str(tiny_model), device="cuda")


def test_head_bias_validates_probabilities():
    with pytest.raises(ValueError):
        head_bias(["a/angry"], {"calm": 1.0})
    with pytest.raises(ValueError):
        head_bias(["a/angry", "b/happy"], {"angry": 1.2})
