"""emotion2vec through FunASR: loading, labels, exact batched inference, refusing bad checkpoints."""

import numpy as np
import pytest
import torch
from conftest import speech_like

from emotion.engine.model import EmotionModel, document_block_mask, english_label, plan_pack
from emotion.errors import ModelUnavailable
from emotion.settings import LABELS
from emotion.tools.checkpoint import head_bias, write_checkpoint

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


@pytest.fixture(scope="module")
def packed(tiny_model):
    """Packed as on a GPU, where token budgets come with compiling: here FlexAttention runs
    unfused, so the budgets are small."""
    model = EmotionModel(str(tiny_model), device="cpu")
    model.budgets = (512, 3072)  # the mixed batch below fills 3,003 tokens of 3,072
    return model


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_packed_batch_scores_equal_funasr_generate_per_clip(packed):
    """Mixed lengths and loudness in one packed pass, rounded up to its budget with filler:
    each clip as FunASR scores it alone."""
    gains = [0.01, 3.0, 1.0, 10.0, 0.2, 1.0, 0.5]
    waves = [speech_like(s, seed=i) * g for i, (s, g) in enumerate(zip(LENGTHS_S, gains))]
    batched = packed.forward(waves)
    for wave, out in zip(waves, batched):
        labels, reference = funasr_scores(packed, wave)
        assert labels == packed.labels
        assert np.abs(out.probs - reference).max() < 1e-4
    lone = packed.forward([waves[0]])[0]  # packed alone, into the smallest budget
    assert lone.frames == batched[0].frames and np.abs(lone.probs - batched[0].probs).max() < 1e-5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_without_zeroing_between_clips_packed_clips_drift(packed, tiny_model):
    """The positional convolution would leak neighbours into a clip's edge frames: the
    hooks are what make packed batches exact."""
    leaky = EmotionModel(str(tiny_model), device="cpu")
    leaky.budgets = packed.budgets
    for module in leaky.net.modules():
        module._forward_pre_hooks.clear()
    short, long = speech_like(0.6, seed=1), speech_like(6.0, seed=2)
    alone = packed.forward([short], embeddings=True)[0].embedding
    assert np.abs(alone - leaky.forward([short, long], embeddings=True)[0].embedding).max() > 1e-3
    assert np.abs(alone - packed.forward([short, long], embeddings=True)[0].embedding).max() < 1e-5


def test_plan_pack_places_clips_on_stride_boundaries_with_a_gap(model):
    lengths = [16000, 4_001, 480_000, 3_210]
    pack = plan_pack(lengths, frames=model.frames, stride=model.stride, receptive=model.frames_to_samples(1),
                     extra=10, gap=9)
    assert all(start % model.stride == 0 for start in pack.sample_start)
    frames = [model.frames(n) for n in lengths]
    assert pack.frame_counts.tolist() == frames and pack.frame_keep.sum() == sum(frames)
    runs = np.diff(np.flatnonzero(np.diff(np.r_[False, pack.frame_keep, False])))[1::2]
    assert runs.tolist() == [9, 9, 9]  # zero frames between clips, as far as the positional convolution reaches
    assert pack.is_extra.sum() == 40 and len(pack.doc) == sum(frames) + 40 and (pack.doc >= 0).all()
    assert pack.samples == pack.sample_start[-1] + lengths[-1]  # the last clip whole, for its layer norm


def test_document_block_mask_visits_exactly_the_blocks_that_hold_allowed_scores():
    rng = np.random.default_rng(0)
    for _ in range(20):
        sizes = rng.integers(1, 400, rng.integers(1, 8))
        filler = int(rng.integers(0, 300))
        doc = np.concatenate([np.repeat(np.arange(len(sizes)), sizes), -1 - np.arange(filler)]).astype(np.int32)
        allowed = doc[:, None] == doc[None, :]
        n = -(-len(doc) // 128)
        padded = np.zeros((n * 128, n * 128), bool)
        padded[: len(doc), : len(doc)] = allowed
        blocks = padded.reshape(n, 128, n, 128).transpose(0, 2, 1, 3)
        valid = np.zeros_like(padded)
        valid[: len(doc), : len(doc)] = True
        valid = valid.reshape(n, 128, n, 128).transpose(0, 2, 1, 3)
        mask = document_block_mask(doc, torch.device("cpu"))
        visited = mask.to_dense()[0, 0].numpy().astype(bool)
        full = np.zeros((n, n), bool)
        for i in range(n):
            full[i, mask.full_kv_indices[0, 0, i, : mask.full_kv_num_blocks[0, 0, i]].numpy()] = True
        assert (visited == blocks.any((2, 3))).all()
        assert (full == (blocks == valid).all((2, 3)) & blocks.any((2, 3))).all()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_embeddings_and_frames(model, packed):
    out = model.forward([speech_like(1.0), speech_like(2.0)], frames=True, embeddings=True)
    for alone, together in zip(out, packed.forward([speech_like(1.0), speech_like(2.0)], frames=True, embeddings=True)):
        assert np.abs(alone.frame_embeddings - together.frame_embeddings).max() < 1e-5
        assert np.abs(alone.frame_probs - together.frame_probs).max() < 1e-5
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
