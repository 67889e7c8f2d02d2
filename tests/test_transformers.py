"""flash as a transformers attention backend: tiny random models, flash against an exact reference.

Every model is built from a config here (nothing is downloaded): 2 layers, hidden 64, 4 query heads
over 2 K/V heads (GQA), head_dim 16, vocab 128, with ``initializer_range=0.1`` so that attention is
peaked and a wrong mask moves the logits by O(1) (``test_window_off_by_one_is_caught`` shows it).

The reference is the same model (same weights) with ``attn_implementation="exact_reference"``:
transformers' own masks (its SDPA mask functions, always materialised) applied to a dense float64
attention with softcap, registered below. It stands in for ``"sdpa"``, which ignores Gemma 2's
softcap, and for ``"eager"``, which rounds the softmax to float32 and turns padded float64 rows into
NaN; ``test_reference_is_sdpa_where_sdpa_applies`` ties it to ``"sdpa"``.

Tolerance: models run in float64, where flash and the reference differ only by rounding (~1e-16
relative); 1e-10 leaves a margin of 10^5 and is 10^7 below what a masking error does. The float32
test (and the GPU tier's fp16/bf16 one) applies the suite's rule instead: error against the float64
reference at most 2 x the error of the same dense reference computed in the model's precision.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AttentionInterface  # noqa: E402
from transformers import masking_utils as mu  # noqa: E402

import flash  # noqa: E402
import flash.integrations.transformers as flash_hf  # noqa: E402
from flash import InvalidInputError  # noqa: E402
from flash.integrations.transformers import attention as hf_attention  # noqa: E402
from flash.integrations.transformers import mask as hf_mask  # noqa: E402
from flash.testing import assert_within_rule  # noqa: E402

REFERENCE = "exact_reference"
TOL = {"rtol": 1e-10, "atol": 1e-10}


def exact_mask(*args, **kwargs):
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return mu.sdpa_mask(*args, **kwargs)


def exact_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, s_aux=None, **kwargs
):
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = query @ key.transpose(2, 3) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    if s_aux is not None:  # gpt-oss: one more logit per head in every row's softmax, then dropped
        sink = s_aux.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ value).transpose(1, 2), None


AttentionInterface.register(REFERENCE, exact_attention)
mu.AttentionMaskInterface.register(REFERENCE, exact_mask)

COMMON = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 128,
    "initializer_range": 0.1,
    "pad_token_id": 0,
    "bos_token_id": None,
    "eos_token_id": None,
}
FAMILIES = {
    "llama": lambda: (transformers.LlamaConfig(**COMMON), transformers.LlamaForCausalLM),
    # Mistral: a window on every layer, shorter than the sequences.
    "mistral": lambda: (transformers.MistralConfig(**COMMON, sliding_window=4), transformers.MistralForCausalLM),
    # Qwen2: the second layer slides, the first does not.
    "qwen2": lambda: (
        transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=3, max_window_layers=1),
        transformers.Qwen2ForCausalLM,
    ),
    # Gemma 2: alternating sliding/full layers, softcapped scores, scaling = query_pre_attn_scalar**-0.5.
    "gemma2": lambda: (
        transformers.Gemma2Config(
            **COMMON,
            sliding_window=4,
            attn_logit_softcapping=3.0,
            query_pre_attn_scalar=8,
            final_logit_softcapping=None,
        ),
        transformers.Gemma2ForCausalLM,
    ),
}
BATCH, SEQLEN = 3, 10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on several threads spend their time waiting for each other (30 ms per linear on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(family: str, implementation: str, dtype: torch.dtype = torch.float64, **overrides):
    config, cls = FAMILIES[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(1234)  # same weights for every implementation: drawn in float64, then rounded to dtype
    model = cls._from_config(copy.deepcopy(config), attn_implementation=implementation, dtype=torch.float64)
    return model.to(dtype).eval()


def inputs(case: str) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, COMMON["vocab_size"], (BATCH, SEQLEN), generator=g)
    mask = torch.ones(BATCH, SEQLEN, dtype=torch.long)
    position_ids = None
    if case == "left":
        mask[0, :4] = 0
        mask[1, :1] = 0
    elif case == "right":
        mask[0, 6:] = 0
        mask[2, 9:] = 0
    elif case == "packed":  # several sequences per row, each restarting at position 0
        position_ids = torch.tensor(
            [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], list(range(10)), [0, 1, 0, 1, 2, 3, 4, 5, 0, 1]], dtype=torch.long
        )
    ids = ids.masked_fill(mask == 0, COMMON["pad_token_id"])
    labels = ids.masked_fill(mask == 0, -100)
    return {
        "input_ids": ids,
        "attention_mask": mask if case in ("left", "right") else None,
        "position_ids": position_ids,
        "labels": labels,
    }


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if anything calls PyTorch's SDPA (transformers' sdpa path, or flash's drop-in falling back);
    yield the record of flash's attention calls."""

    def forbidden(*args, **kwargs):
        raise AssertionError("torch's scaled_dot_product_attention was called")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", forbidden)
    monkeypatch.setattr(flash.api, "_torch_sdpa", forbidden)
    with flash_hf.record_calls() as calls:
        yield calls


def assert_all_flash(calls, count: int, paths: set[str]) -> None:
    assert len(calls) == count
    assert {c.path for c in calls} <= paths, {c.path for c in calls}
    known = {b.name for b in flash.backends()}
    for call in calls:
        assert call.forward_backend in known and call.backward_backend in known, call


def forward_backward(model, batch):
    model.zero_grad()
    out = model(**batch, use_cache=False)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


# --------------------------------------------------------------------------- registration


def test_registered_under_a_name_transformers_does_not_intercept():
    from transformers.utils.generic import is_flash_attention_requested

    assert "flash" not in flash_hf.NAME
    assert not is_flash_attention_requested(requested_attention_implementation=flash_hf.NAME)
    assert flash_hf.register() == flash_hf.register() == flash_hf.NAME  # idempotent
    assert AttentionInterface()[flash_hf.NAME] is flash_hf.attention_forward
    assert mu.AttentionMaskInterface()[flash_hf.NAME] is flash_hf.padding_mask


def test_import_flash_does_not_import_transformers():
    code = (
        "import sys, flash, flash.padding, flash.compat.flash_attn, flash.integrations; "
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_from_pretrained_and_from_config(tmp_path, no_fallback):
    build("llama", "sdpa").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=flash_hf.NAME)
    assert model.config._attn_implementation == flash_hf.NAME
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    other = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=flash_hf.NAME)
    assert other.config._attn_implementation == flash_hf.NAME
    model(torch.randint(1, 128, (1, 5)))
    assert_all_flash(no_fallback, 2, {"dense"})


# --------------------------------------------------------------------------- models against the reference


def test_reference_is_sdpa_where_sdpa_applies():
    """The exact reference agrees with transformers' SDPA path (no softcap, so both are exact)."""
    batch = inputs("left")
    reference, sdpa = build("llama", REFERENCE), build("llama", "sdpa")
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(forward_backward(reference, batch)[0][valid], forward_backward(sdpa, batch)[0][valid])


@pytest.mark.parametrize("case", ["full", "left", "right", "packed"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_loss_and_gradients(family, case, no_fallback):
    batch = inputs(case)
    ours = forward_backward(build(family, flash_hf.NAME), batch)
    calls = list(no_fallback)
    want = forward_backward(build(family, REFERENCE), batch)
    valid = batch["labels"] != -100  # padded positions are not compared (flash leaves them 0)
    torch.testing.assert_close(ours[0][valid], want[0][valid], **TOL)
    torch.testing.assert_close(ours[1], want[1], **TOL)
    assert ours[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(ours[2][name], want[2][name], **TOL, msg=lambda m, n=name: f"grad of {n}: {m}")
    path = {"full": "dense", "left": "padded", "right": "padded", "packed": "packed"}[case]
    assert_all_flash(calls, COMMON["num_hidden_layers"], {path})


def test_packed_by_cu_seq_lens_like_the_flattening_collator(no_fallback):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) hands over cu_seq_lens_q/k and max_length_q/k."""
    batch = inputs("packed")
    ids, position_ids = batch["input_ids"][:1], batch["position_ids"][:1]
    cu = torch.tensor([0, 4, 7, 10], dtype=torch.int32)
    extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 4, "max_length_k": 4}
    got = build("mistral", flash_hf.NAME)(ids, position_ids=position_ids, use_cache=False, **extra).logits
    assert_all_flash(no_fallback, 2, {"packed"})
    # transformers' masks read packing from the position ids only without a cache
    want = build("mistral", REFERENCE)(ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(got, want, **TOL)


def test_float32_model_under_the_tolerance_rule():
    batch = inputs("left")
    with flash_hf.record_calls() as calls:
        ours = build("llama", flash_hf.NAME, torch.float32)(**batch, use_cache=False).logits
    assert_all_flash(calls, 2, {"padded"})
    oracle = build("llama", REFERENCE)(**batch, use_cache=False).logits
    naive = build("llama", REFERENCE, torch.float32)(**batch, use_cache=False).logits  # dense, in float32
    valid = batch["attention_mask"].bool()
    assert_within_rule("float32 logits", ours[valid], oracle[valid], naive[valid], torch.float32)


def test_window_off_by_one_is_caught(monkeypatch):
    """The comparisons above can fail: a window one key too wide moves Mistral's logits by O(1)."""
    monkeypatch.setattr(hf_attention, "_window", lambda w, causal: None if w is None else (w, 0))
    batch = inputs("full")
    got = forward_backward(build("mistral", flash_hf.NAME), batch)[0]
    want = forward_backward(build("mistral", REFERENCE), batch)[0]
    assert (got - want).abs().max() > 1e-2


@pytest.mark.parametrize(("family", "cache"), [(f, "dynamic") for f in sorted(FAMILIES)] + [("gemma2", "static")])
def test_greedy_generate_with_left_padding(family, cache, no_fallback):
    """Prefill then decode (q_len 1 over past + 1 keys), windows shorter than the text, a KV cache."""
    batch = inputs("left")
    ids, mask = batch["input_ids"][:, :6], batch["attention_mask"][:, :6]
    options = {"max_new_tokens": 8, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    ours = build(family, flash_hf.NAME).generate(ids, attention_mask=mask, cache_implementation=cache, **options)
    assert_all_flash(no_fallback, 8 * COMMON["num_hidden_layers"], {"padded", "dense"})
    assert "padded" in {c.path for c in no_fallback}
    want = build(family, REFERENCE).generate(ids, attention_mask=mask, cache_implementation=cache, **options)
    assert torch.equal(ours.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(want.logits), **TOL)


def test_dropout_only_in_training_and_seeded_by_torch():
    model = build("llama", flash_hf.NAME, attention_dropout=0.5)
    ids = inputs("full")["input_ids"]
    plain = model(ids).logits  # eval: no dropout
    torch.testing.assert_close(plain, build("llama", REFERENCE)(ids).logits, **TOL)
    model.train()
    torch.manual_seed(3)
    first = model(ids).logits
    torch.manual_seed(3)
    again = model(ids).logits
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert (first - plain).abs().max() > 1e-2
    assert not torch.equal(first, model(ids).logits)  # another seed, another mask


def test_dropout_survives_gradient_checkpointing():
    """Recomputing a layer in the backward redraws the seed from the restored generator state: the
    same dropout mask, so the same gradients as without checkpointing."""
    batch = inputs("left")
    grads = []
    for checkpointing in (False, True):
        model = build("llama", flash_hf.NAME, attention_dropout=0.3).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(5)
        grads.append(forward_backward(model, batch)[2])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], **TOL)


@pytest.mark.parametrize("case", ["full", "left"])
def test_gpt_oss_sinks(case, no_fallback):
    """gpt-oss's learned sinks (s_aux), with its alternating sliding layers: logits, loss and every
    gradient, the sinks' own included. Its sink parameters are drawn as float32 values (flash takes
    sinks in float32), so float64 models still agree to rounding."""
    config = transformers.GptOssConfig(
        **{**COMMON, "intermediate_size": 64}, num_local_experts=2, num_experts_per_tok=1, sliding_window=4
    )
    config._experts_implementation = "eager"  # the grouped matmul path has no float64
    batch = inputs(case)
    results = []
    for implementation in (flash_hf.NAME, REFERENCE):
        torch.manual_seed(1234)
        model = transformers.GptOssForCausalLM._from_config(
            copy.deepcopy(config), attn_implementation=implementation, dtype=torch.float64
        ).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("sinks"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)).float())
        results.append(forward_backward(model, batch))
    ours, want = results
    assert {c.path for c in no_fallback} == {"dense" if case == "full" else "padded"}
    valid = batch["labels"] != -100
    torch.testing.assert_close(ours[0][valid], want[0][valid], **TOL)
    torch.testing.assert_close(ours[1], want[1], **TOL)
    assert any(name.endswith("sinks") for name in want[2])
    for name in want[2]:
        # flash's sinks are float32, and so is their gradient: float32 rounding there, float64 elsewhere
        tol = {"rtol": 1e-6, "atol": 1e-7} if name.endswith("sinks") else TOL
        torch.testing.assert_close(ours[2][name], want[2][name], **tol, msg=lambda m, n=name: f"grad of {n}: {m}")


# --------------------------------------------------------------------------- the attention function itself


class Layer(torch.nn.Module):
    def __init__(self, is_causal: bool = True):
        super().__init__()
        self.is_causal = is_causal
        self.layer_idx = 0


def qkv(q_len=6, k_len=6, batch=2, generator=None):
    g = generator or torch.Generator().manual_seed(0)
    q = torch.randn(batch, 4, q_len, 16, dtype=torch.float64, generator=g)
    k, v = (torch.randn(batch, 2, k_len, 16, dtype=torch.float64, generator=g) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 2, 5])
def test_sliding_window_convention(causal, window):
    """transformers' windows: i - w < j <= i when causal, |i - j| <= w otherwise."""
    q, k, v = qkv(q_len=9, k_len=9)
    pattern = mu.sliding_window_causal_mask_function if causal else mu.sliding_window_bidirectional_mask_function
    mask = exact_mask(2, 9, 9, mask_function=pattern(window))
    want = exact_attention(None, q, k, v, mask)[0]
    got, weights = flash_hf.attention_forward(Layer(causal), q, k, v, None, sliding_window=window)
    assert weights is None and got.shape == (2, 9, 4, 16)
    torch.testing.assert_close(got, want, **TOL)


def test_padding_mask_on_keys_only_when_not_causal():
    """Cross-attention: the mask is the keys' and every query is real."""
    q, k, v = qkv(q_len=5, k_len=7)
    keys = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    want = exact_attention(None, q, k, v, keys[:, None, None, :].expand(2, 1, 5, 7))[0]
    got = flash_hf.attention_forward(Layer(is_causal=False), q, k, v, keys)[0]
    torch.testing.assert_close(got, want, **TOL)


def test_value_head_dim_below_query_head_dim():
    q, k, _ = qkv()
    v = torch.randn(2, 2, 6, 8, dtype=torch.float64)
    mask = exact_mask(2, 6, 6)
    torch.testing.assert_close(
        flash_hf.attention_forward(Layer(), q, k, v, None)[0], exact_attention(None, q, k, v, mask)[0], **TOL
    )


def test_dropout_argument_ignored_outside_training():
    q, k, v = qkv()
    layer = Layer().eval()
    torch.testing.assert_close(
        flash_hf.attention_forward(layer, q, k, v, None, dropout=0.5)[0],
        flash_hf.attention_forward(layer, q, k, v, None)[0],
        rtol=0,
        atol=0,
    )
    layer.train()
    torch.manual_seed(0)
    got = flash_hf.attention_forward(layer, q, k, v, None, dropout=0.5)[0]
    torch.manual_seed(0)
    seed = flash.dropout.random_seed()
    want = flash.attention(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, dropout_p=0.5, dropout_seed=seed)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"position_bias": torch.zeros(1)}, "position_bias"),
        ({"attention_mask": torch.ones(2, 1, 6, 6, dtype=torch.bool)}, "attention_mask"),
        ({"attention_mask": torch.tensor([[1, 0, 1, 1, 1, 1]] * 2), "sliding_window": 3}, "between real tokens"),
    ],
)
def test_what_flash_cannot_compute_raises(kwargs, match):
    q, k, v = qkv()
    kwargs.setdefault("attention_mask", None)
    with pytest.raises(NotImplementedError, match=match):
        flash_hf.attention_forward(Layer(), q, k, v, **kwargs)


def test_bad_arguments_name_themselves():
    q, k, v = qkv()
    with pytest.raises(InvalidInputError, match="cu_seq_lens_k"):
        flash_hf.attention_forward(Layer(), q, k, v, None, cu_seq_lens_q=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(InvalidInputError, match="sliding_window"):
        flash_hf.attention_forward(Layer(), q, k, v, None, sliding_window=0)


class TestMaskFunction:
    def test_expressible_patterns_pass(self):
        packed = mu.packed_sequence_mask_function(torch.zeros(1, 4, dtype=torch.long))
        for pattern in (
            mu.causal_mask_function,
            mu.sliding_window_causal_mask_function(4),
            mu.sliding_window_bidirectional_mask_function(4),
            mu.and_masks(mu.causal_mask_function, packed),
        ):
            hf_mask.check_mask_function(pattern)

    @pytest.mark.parametrize(
        ("pattern", "match"),
        [
            (mu.chunked_causal_mask_function(8, torch.zeros(1, dtype=torch.long)), "chunked"),
            (mu.or_masks(mu.causal_mask_function, mu.bidirectional_mask_function), "or_mask_function"),
            (mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: kv >= 0), "<lambda>"),
        ],
    )
    def test_other_patterns_raise(self, pattern, match):
        with pytest.raises(NotImplementedError, match=match):
            hf_mask.check_mask_function(pattern)

    def test_returns_the_padding_mask_or_none(self):
        full = torch.ones(2, 7, dtype=torch.bool)
        assert flash_hf.padding_mask(2, 7, 7, attention_mask=full) is None
        left = full.clone()
        left[0, :2] = False
        assert torch.equal(flash_hf.padding_mask(2, 7, 7, attention_mask=left), left)
        # a sliding layer sees the last kv_length keys: padding outside them does not matter
        assert flash_hf.padding_mask(2, 1, 4, q_offset=6, kv_offset=3, attention_mask=left) is None
        left[1, 4] = False
        assert torch.equal(flash_hf.padding_mask(2, 1, 4, q_offset=6, kv_offset=3, attention_mask=left), left[:, -4:])
        assert flash_hf.padding_mask(2, 3, 3, q_offset=4, kv_offset=4) is None  # a dynamic cache

    def test_static_cache_slots_without_a_mask(self):
        """A static cache's keys run past the last query: the slots that hold no token are masked."""
        got = flash_hf.padding_mask(2, 3, 16, q_offset=torch.tensor(4), kv_offset=0, device="cpu")
        assert got.shape == (2, 7) and bool(got.all())


# --------------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["left", "packed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision_model_under_the_tolerance_rule(case, dtype):
    """On the GPU the layers run on a kernel backend; logits are held to the rule against float64."""
    batch = {k: (v.cuda() if v is not None else None) for k, v in inputs(case).items()}
    with flash_hf.record_calls() as calls:
        ours = build("mistral", flash_hf.NAME, dtype).cuda()(**batch, use_cache=False).logits
    assert len(calls) == 2 and all(c.forward_backend in ("triton", "cuda") for c in calls), calls
    oracle = build("mistral", REFERENCE).cuda()(**batch, use_cache=False).logits
    naive = build("mistral", REFERENCE, dtype).cuda()(**batch, use_cache=False).logits  # dense, in half precision
    valid = batch["labels"] != -100
    assert_within_rule(f"{dtype} logits", ours[valid], oracle[valid], naive[valid], dtype)
