"""Hermetic tests of the native Qwen-VL: tokenizer layout, forward/generate, images, save/reload, adapter."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sc_tune.adapters import adapter_class
from sc_tune.adapters.qwen_vl import QwenVLAdapter
from sc_tune.jsonio import read_json
from sc_tune.models.qwen_vl import QWenLMHeadModel, QWenTokenizer, QWenVLImageProcessor
from sc_tune.models.qwen_vl.modeling import ntk_alpha_for
from sc_tune.tiny.qwen_vl import build_tiny_qwen_vl, save_tiny_qwen_vl
from sc_tune.rollout import GenerationSettings, cycle


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_qwen_vl(str(tmp_path_factory.mktemp("tiny_qwen_vl")))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model = QWenLMHeadModel.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return model, QwenVLAdapter.from_pretrained(tiny_dir)


def _images(adapter, colours=((200, 10, 10), (10, 200, 30))):
    return [adapter.prepare_image(Image.new("RGB", (40, 30), c)) for c in colours]


def test_special_tokens_follow_the_bpe_ranks_in_official_order(tiny_dir):
    tok = QWenTokenizer.from_pretrained(tiny_dir, image_token_span=4)
    ranks = len(tok.mergeable_ranks)
    # Offsets of the official layout: 151643 + (0, 208, 209, 210, 211, 214, 215, 216).
    expected = {"<|endoftext|>": 0, "<ref>": 208, "</ref>": 209, "<box>": 210, "</box>": 211,
                "<img>": 214, "</img>": 215, "<imgpad>": 216}
    assert {t: tok.convert_tokens_to_ids(t) - ranks for t in expected} == expected
    assert tok.pad_token_id == tok.eos_token_id == ranks
    ids = tok("<img>ab</img> (12,3)", add_special_tokens=False)["input_ids"]
    pad, start = ranks + 216, ranks + 214
    assert ids[:6] == [start, ord("a"), ord("b"), pad, pad, ranks + 215]
    pieces = [tok.decode([i]) for i in ids[6:]]
    assert "".join(pieces) == " (12,3)" and "1" in pieces and "2" in pieces  # digits one per token
    assert tok.decode(ids) == "<img>ab</img> (12,3)"
    assert tok.decode(ids + [ranks], skip_special_tokens=True) == "ab (12,3)"
    with pytest.raises(ValueError, match="at most 4"):
        tok("<img>abcde</img>")


def test_the_tiny_vocabulary_is_byte_level_bpe_learned_greedily(tmp_path):
    """``sc_tune.tiny.qwen_vl.learn_bpe_ranks``, worked by hand: the 256 bytes first (rank = byte), then each merge of
    the most frequent adjacent pair within Qwen's pre-tokenised words, ties to the larger pair of bytes, merged left to
    right without overlap, until no pair is left. "abab ab" splits into "abab" and " ab": (a, b) occurs 3 times, then
    (ab, ab) and (" ", ab) once each (the tie goes to b"ab" > b" "). "aaaa": (a, a) 3 times, merged as aa|aa."""
    from sc_tune.tiny.qwen_vl import learn_bpe_ranks, save_tiny_vocab

    ranks = learn_bpe_ranks(["abab ab"], num_merges=5)
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert {piece: rank for piece, rank in ranks.items() if rank >= 256} == {b"ab": 256, b"abab": 257, b" ab": 258}
    assert {piece: rank for piece, rank in learn_bpe_ranks(["aaaa"]).items() if rank >= 256} == {b"aa": 256,
                                                                                                b"aaaa": 257}
    assert len(learn_bpe_ranks(["abab ab"], num_merges=1)) == 257  # stops at the count asked for
    # a three-way tie decided by the pairs' bytes, not by the order met: (b, a) over (a, b) and (" ", b)
    assert {piece for piece, rank in learn_bpe_ranks(["ab ba"], num_merges=1).items() if rank >= 256} == {b"ba"}
    # written and read back as the tokenizer's ranks: the learned merges encode the corpus
    tokenizer = QWenTokenizer(save_tiny_vocab(str(tmp_path), ["abab ab"], num_merges=5), image_token_span=4)
    assert tokenizer.mergeable_ranks == ranks
    assert tokenizer("abab ab")["input_ids"] == [257, 258]


def test_an_image_span_that_fills_exactly_or_follows_text_decodes_back(tiny_dir):
    """The official prompt puts text before each image ("Picture 1: <img>PATH</img>\\n"); a path of exactly the
    span's bytes takes no padding. Both decode back to the text, one image or two."""
    tok = QWenTokenizer.from_pretrained(tiny_dir, image_token_span=4)
    ranks = len(tok.mergeable_ranks)
    start, end = ranks + 214, ranks + 215
    text = "Picture 1: <img>abcd</img>\nwhere?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    at = ids.index(start)
    assert at > 0 and ids[at : at + 6] == [start, *b"abcd", end]  # 4 bytes in a span of 4: no <imgpad>
    assert tok.decode(ids) == text
    two = "Picture 1: <img>ab</img>\nPicture 2: <img>c</img>\nsame?"
    assert tok.decode(tok(two, add_special_tokens=False)["input_ids"]) == two
    # A span a model wrote itself may hold ids that are no byte (and no padding): those go, every byte stays.
    assert tok.decode([start, 0, ord("a"), 256, ord("b"), end]) == "<img>\x00ab</img>"
    assert tok.decode([start, end, ord("a")]) == "<img></img>a"


def test_skipping_special_tokens_keeps_the_grounding_tags_only_when_asked(tiny_dir):
    """As the official tokenizer (its chat stream decodes with ``keep_image_special=True``): skipping special tokens
    drops the image tags and the chat markers, and keeps <ref>, <box> and <quad> only when asked."""
    tok = QWenTokenizer.from_pretrained(tiny_dir, image_token_span=4)
    answer = "Picture 1: <img>ab</img>\n<ref>a dog</ref><box>(1,2),(3,4)</box><quad>(5,6)</quad><|im_end|>"
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "Picture 1: ab\na dog(1,2),(3,4)(5,6)"
    assert tok.decode(ids, skip_special_tokens=True, keep_image_special=True) == (
        "Picture 1: ab\n<ref>a dog</ref><box>(1,2),(3,4)</box><quad>(5,6)</quad>")


def test_the_tokenizer_maps_tokens_and_ids_both_ways_and_adds_none(tiny_dir, tmp_path):
    tok = QWenTokenizer.from_pretrained(tiny_dir, image_token_span=4)
    ranks = len(tok.mergeable_ranks)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<img>", b"a"]) == [ranks, ranks + 214, ord("a")]
    assert tok.convert_tokens_to_ids(b"\xff\xfe\xfd never a rank") is None  # as the official: no unknown token
    assert tok.convert_ids_to_tokens([ranks, ranks + 214, ord("a")]) == ["<|endoftext|>", "<img>", b"a"]
    text = "a dog <ref>\u00e9t\u00e9</ref>"  # multi-byte characters split across byte tokens
    assert tok.convert_tokens_to_string(tok.tokenize(text)) == text
    with pytest.raises(ValueError, match=f"unknown id {len(tok)}"):
        tok.convert_ids_to_tokens([len(tok)])
    # The vocabulary is fixed: a built-in special token "adds" nothing, any other token is refused.
    assert tok.add_special_tokens({"eos_token": "<|endoftext|>"}) == 0 and len(tok) == ranks + 217
    with pytest.raises(ValueError, match="cannot add token '<new>': its vocabulary is fixed"):
        tok.add_tokens(["<new>"])
    saved = tok.save_vocabulary(str(tmp_path), "copy")[0]
    assert os.path.basename(saved) == "copy-qwen.tiktoken"
    assert QWenTokenizer(saved).mergeable_ranks == tok.mergeable_ranks
    # A damaged vocabulary file names its line.
    ranks_file = tmp_path / "qwen.tiktoken"
    ranks_file.write_text("IQ== 0\nIg== 1\nnot-a-rank-line\n")
    with pytest.raises(ValueError, match=f"{ranks_file}, line 3: expected '<base64 token> <rank>'"):
        QWenTokenizer(str(ranks_file))


def test_config_and_weights_are_written_in_official_layout(tiny_dir):
    config = json.load(open(os.path.join(tiny_dir, "config.json")))
    assert config["model_type"] == "qwen" and config["architectures"] == ["QWenLMHeadModel"]
    # the model finds an image by the tokenizer's <img> id (the release's 151857); the embedding rows are the
    # vocabulary padded up to a multiple of 64 (the release pads its 151,860 tokens to 151,936)
    tok = QWenTokenizer.from_pretrained(tiny_dir, image_token_span=4)
    assert config["visual"]["image_start_id"] == tok.convert_tokens_to_ids("<img>")
    assert config["vocab_size"] % 64 == 0 and len(tok) <= config["vocab_size"] < len(tok) + 64
    # the release's switches and lengths (dynamic NTK and logn scaling start past seq_length), sizes shrunk
    assert {key: config[key] for key in ("seq_length", "max_position_embeddings", "use_dynamic_ntk", "use_logn_attn",
                                         "no_bias", "kv_channels")} == {
        "seq_length": 2048, "max_position_embeddings": 8192, "use_dynamic_ntk": True, "use_logn_attn": True,
        "no_bias": True, "kv_channels": config["hidden_size"] // config["num_attention_heads"]}
    assert type(config["kv_channels"]) is int and config["visual"]["patch_size"] == 14
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    generation = json.load(open(os.path.join(tiny_dir, "generation_config.json")))
    assert generation["chat_format"] == "chatml" and generation["max_window_size"] == 6144
    keys = set(load_file(os.path.join(tiny_dir, "model.safetensors")))
    for key in ("transformer.wte.weight", "transformer.h.1.ln_1.weight", "transformer.h.1.attn.c_attn.bias",
                "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.w1.weight", "transformer.h.0.mlp.w2.weight",
                "transformer.h.0.mlp.c_proj.weight", "transformer.ln_f.weight", "lm_head.weight",
                "transformer.visual.conv1.weight", "transformer.visual.positional_embedding",
                "transformer.visual.transformer.resblocks.1.attn.in_proj.weight",
                "transformer.visual.transformer.resblocks.1.mlp.c_fc.weight",
                "transformer.visual.attn_pool.attn.in_proj_weight", "transformer.visual.attn_pool.pos_embed",
                "transformer.visual.attn_pool.kv_proj.weight", "transformer.visual.proj"):
        assert key in keys, key
    assert not any("rotary" in k or "masked_bias" in k or "attn.c_proj.bias" in k for k in keys)
    # 2 LM layers x 8 tensors + wte, ln_f, lm_head; 2 ViT blocks x 12; conv1, positions, ln_pre x2,
    # resampler x11, ln_post x2, proj.
    assert len(keys) == 2 * 8 + 3 + 2 * 12 + 18


def test_reload_gives_equal_tensors_and_bf16_loads(tiny_dir, tmp_path):
    model = QWenLMHeadModel.from_pretrained(tiny_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    again = QWenLMHeadModel.from_pretrained(tmp_path, dtype=torch.float32)
    state, state_again = model.state_dict(), again.state_dict()
    assert state.keys() == state_again.keys()
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    # The fixed sin-cos table is stored, not re-derived: it survives meta-device loading.
    pos = state["transformer.visual.attn_pool.pos_embed"]
    assert pos.abs().sum() > 0 and torch.allclose(pos, model.transformer.visual.attn_pool.fixed_positions())
    bf16 = QWenLMHeadModel.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16


def test_left_padded_batch_matches_single_rows_and_cache(tiny):
    model, adapter = tiny
    images = _images(adapter)
    prompts = [adapter.describer_prompt([0.1, 0.2, 0.5, 0.9], images[0]), adapter.locator_prompt("a red dog", images[1])]
    batch = adapter.build_batch(prompts, images)
    assert batch.inputs["attention_mask"][0].sum() != batch.inputs["attention_mask"][1].sum()  # padding present
    with torch.no_grad():
        logits = model(**batch.inputs).logits
        last = model(**batch.inputs, logits_to_keep=1).logits
        assert (last[:, 0] - logits[:, -1]).abs().max() < 1e-6
        for row in range(2):
            single = adapter.build_batch([prompts[row]], [images[row]])
            single_logits = model(**single.inputs).logits[0]
            n = single_logits.shape[0]
            assert (logits[row, -n:] - single_logits).abs().max() < 1e-5
    settings = GenerationSettings(max_new_tokens=6)
    kwargs = {**settings.generate_kwargs(), **adapter.generation_kwargs(describer=True)}
    with_cache = model.generate(**batch.inputs, **kwargs)
    without_cache = model.generate(**batch.inputs, **kwargs, use_cache=False)
    assert torch.equal(with_cache, without_cache)
    suppressed = set(adapter.suppressed_token_ids(describer=True))
    assert not suppressed & set(with_cache[:, batch.input_ids.shape[1]:].flatten().tolist())


def test_image_features_replace_the_span_and_only_affect_later_tokens(tiny):
    model, adapter = tiny
    red, green = _images(adapter)
    text = "The picture <img></img> is"
    with torch.no_grad():
        a = model(**adapter.build_batch([text], [red]).inputs).logits[0]
        b = model(**adapter.build_batch([text], [green]).inputs).logits[0]
    ids = adapter.encode_prompt(text, red)
    start = ids.index(adapter.img_start_id)
    assert torch.equal(a[: start + 1], b[: start + 1])
    assert (a[start + 1 :] - b[start + 1 :]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="no `images`"):
        model(input_ids=torch.tensor([ids]))


def test_gradient_checkpointing_gives_the_same_loss_and_grads(tiny_dir):
    model = QWenLMHeadModel.from_pretrained(tiny_dir, dtype=torch.float32)
    adapter = QwenVLAdapter.from_pretrained(tiny_dir)
    images = _images(adapter)
    batch = adapter.build_batch([adapter.locator_prompt("a cat", im) for im in images], images,
                                targets=[adapter.locator_target([0.1, 0.2, 0.3, 0.4], im, "x") for im in images])
    model.train()

    def loss_and_grads():
        model.zero_grad()
        loss = model(**batch.inputs, labels=batch.labels).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads()
    model.gradient_checkpointing_enable()
    ckpt_loss, ckpt_grads = loss_and_grads()
    assert abs(plain_loss - ckpt_loss) < 1e-6 and plain_loss > 0
    assert plain_grads.keys() == ckpt_grads.keys() and "transformer.visual.attn_pool.query" in plain_grads
    assert max((plain_grads[k] - ckpt_grads[k]).abs().max().item() for k in plain_grads) < 1e-5


def test_adapter_prompts_targets_and_prefixes(tiny):
    model, adapter = tiny
    assert adapter_class("qwen") is QwenVLAdapter
    image = _images(adapter)[0]
    box = [0.1, 0.25, 0.5, 1.0]
    assert adapter.describer_prompt(box, image) == "<img></img><ref>This</ref><box>(100,250),(500,999)</box> is"
    assert adapter.locator_prompt("the cat", image) == "<img></img><ref>the cat</ref><box>"
    target = adapter.locator_target(box, image, "the cat")
    assert target == "(100,250),(500,999)</box><|endoftext|>"
    assert adapter.parse_locator_output(target, image) == [100 / 999, 250 / 999, 500 / 999, 1.0]
    batch = adapter.build_batch([adapter.locator_prompt("the cat", image)], [image], targets=[target])
    target_ids = batch.labels[0][batch.labels[0] != -100].tolist()
    assert adapter.tokenizer.decode(target_ids) == target and target_ids[-1] == adapter.tokenizer.eod_id
    assert batch.inputs["images"].shape == (1, 3, 28, 28)
    names = [n for n, _ in model.named_modules()]
    lora = [n for n in names if re.fullmatch(adapter.lora_target_modules, n)]
    assert len(lora) == 4 * model.config.num_hidden_layers and not any("visual" in n for n in lora)
    frozen = [n for n, _ in model.named_parameters()
              if n.startswith(adapter.vision_prefix) and not n.startswith(adapter.vision_trainable_prefixes)]
    kept = [n for n, _ in model.named_parameters() if n.startswith(adapter.vision_trainable_prefixes)]
    assert "transformer.visual.conv1.weight" in frozen and "transformer.visual.proj" in frozen
    assert len(kept) == 10  # query, kv_proj, in_proj w/b, out_proj w/b, ln_q w/b, ln_kv w/b (pos_embed: a buffer)
    assert adapter.end_token_ids == [adapter.pad_token_id] == [adapter.tokenizer.eod_id]


def test_describe_locate_cycle_runs_batched(tiny):
    model, adapter = tiny
    images = _images(adapter)
    result = cycle(model, model, adapter, images, [[0.1, 0.1, 0.6, 0.7], [0.0, 0.2, 1.0, 0.9]],
                   GenerationSettings(max_new_tokens=5), GenerationSettings(max_new_tokens=8))
    assert len(result.captions.texts) == len(result.boxes) == 2
    assert result.captions.ids_BT.shape[0] == 2


def test_ntk_alpha_and_image_processor_values():
    assert [ntk_alpha_for(n, 2048) for n in (10, 1024, 2048, 2049, 4096, 4097, 8192)] == [1, 1, 1, 3, 3, 7, 7]
    processor = QWenVLImageProcessor(image_size=28)
    pixels = processor(Image.new("RGB", (50, 20), (255, 0, 128)))
    assert pixels.shape == (1, 3, 28, 28)
    expected = [(1.0 - 0.48145466) / 0.26862954, (0.0 - 0.4578275) / 0.26130258, (128 / 255 - 0.40821073) / 0.27577711]
    assert torch.allclose(pixels[0, :, 5, 5], torch.tensor(expected), atol=1e-6)


def test_build_tiny_is_deterministic(tmp_path):
    a, _, _ = build_tiny_qwen_vl(str(tmp_path / "a"), seed=3)
    b, _, _ = build_tiny_qwen_vl(str(tmp_path / "b"), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _as_qwen2(model: QWenLMHeadModel, rope_theta: float | None = None):
    """transformers' Qwen2ForCausalLM holding ``model``'s language-model weights, renamed and c_attn split (its
    rotary base ``rope_theta``, by default ``model``'s)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = model.config
    qwen2 = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size // 2,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, rms_norm_eps=config.layer_norm_epsilon,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta or config.rotary_emb_base}))
    ours = {name: tensor for name, tensor in model.state_dict().items() if ".visual." not in name}
    renamed = {"model.embed_tokens.weight": ours.pop("transformer.wte.weight"),
               "model.norm.weight": ours.pop("transformer.ln_f.weight"), "lm_head.weight": ours.pop("lm_head.weight")}
    for i in range(config.num_hidden_layers):
        block, layer = f"transformer.h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = ours.pop(f"{block}attn.c_attn.{kind}").split(config.hidden_size, dim=0)
            renamed |= {f"{layer}self_attn.{name}_proj.{kind}": t for name, t in zip("qkv", (q, k, v))}
        for theirs, mine in (("self_attn.o_proj", "attn.c_proj"), ("mlp.gate_proj", "mlp.w2"),
                             ("mlp.up_proj", "mlp.w1"), ("mlp.down_proj", "mlp.c_proj"),
                             ("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            renamed[f"{layer}{theirs}.weight"] = ours.pop(f"{block}{mine}.weight")
    assert not ours, f"language-model weights left unmapped: {sorted(ours)}"  # no output or MLP biases either
    missing, unexpected = qwen2.load_state_dict(renamed, strict=False)
    assert (missing, unexpected) == ([], [])
    return qwen2.eval()


def _randomized_tiny_qwen_vl(directory, **config):
    model, _, _ = build_tiny_qwen_vl(str(directory), **config)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model.eval()


def test_the_language_model_is_transformers_qwen2_with_the_weights_renamed(tmp_path):
    """Below ``seq_length`` (no dynamic NTK, no logn scaling) QWen-7B's decoder is the architecture transformers ships
    as Qwen2: q, k and v with biases (one fused ``c_attn`` here), no output bias, RMSNorm, half-split rotary, and a
    SwiGLU MLP whose gate is ``w2`` (llama.cpp's tensor map reads ``transformer.h.N.mlp.w2`` as the gate). The
    official remote code is the reference where it is at hand (``test_qwen_vl_official``); this independent one runs
    everywhere. Every parameter is drawn at random (biases and norm weights too); a left-padded row takes its column
    indices as positions, as the official model does."""
    model = _randomized_tiny_qwen_vl(tmp_path)
    qwen2 = _as_qwen2(model)
    input_ids = torch.randint(0, 200, (3, 12))  # plain text tokens (no <img> span)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, :5] = 0
    with torch.no_grad():
        ours = model(input_ids=input_ids, attention_mask=attention_mask).logits
        theirs = qwen2(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=torch.arange(12).expand(3, 12)).logits
    assert ours.abs().max() > 1.0  # logits far from zero: the comparison below is not of near-zero numbers
    real = attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)


def _reference_sincos(dim: int, side: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table, as the official resampler builds it: ``np.meshgrid(grid_w, grid_h)[0]``, the column
    index, drives the first half of the channels; each half is [sin | cos] of position x 1 / 10000^(i / (d / 2))."""
    def axis(half: int, positions: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64) / (half / 2))
        angles = positions.double()[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.cat([axis(dim // 2, cols.flatten()), axis(dim // 2, rows.flatten())], dim=1).float()


def _reference_resized(table: torch.Tensor, side: int) -> torch.Tensor:
    """The official ``get_abs_pos``: a square table resized bicubically (align_corners off) to ``side`` x ``side``."""
    source = round(table.shape[0] ** 0.5)
    if source == side:
        return table
    grid = table.reshape(1, source, source, -1).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(side * side, -1)


def _reference_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Scaled dot-product attention of one image's (L, C) rows, head by head, written out."""
    d = q.shape[1] // heads
    out = []
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        out.append(torch.softmax(q[:, part] @ k[:, part].T / d**0.5, dim=-1) @ v[:, part])
    return torch.cat(out, dim=1)


def _reference_tower(visual, pixels_N3HW: torch.Tensor) -> torch.Tensor:
    """The official Qwen-VL vision tower, one image at a time, from its parameters alone: 14 x 14 patches (no bias)
    plus the learned 16 x 16 table resized; pre-norm blocks whose fused ``in_proj`` is laid out head by head
    (``[head][q|k|v]``); the resampler's queries and keys carrying the sin-cos table (the keys' resized to the patch
    grid), its values not, through ``nn.MultiheadAttention``'s block layout (``[q|k|v]``); post-norm, then ``proj``."""
    def norm(x, module):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], module.weight, module.bias, eps=1e-6)

    def linear(x, module):
        return x @ module.weight.T + (0 if module.bias is None else module.bias)

    pool = visual.attn_pool
    side = round(pool.query.shape[0] ** 0.5)
    features = []
    for image in pixels_N3HW:
        p = visual.conv1.kernel_size[0]
        patches = image.unfold(1, p, p).unfold(2, p, p)  # (3, grid_h, grid_w, p, p)
        grid = patches.shape[1]
        x = patches.permute(1, 2, 0, 3, 4).reshape(grid * grid, -1) @ visual.conv1.weight.flatten(1).T
        x = norm(x + _reference_resized(visual.positional_embedding, grid), visual.ln_pre)
        for block in visual.transformer.resblocks:
            heads, width = block.attn.heads, x.shape[1]
            qkv = linear(norm(x, block.ln_1), block.attn.in_proj).reshape(len(x), heads, 3, width // heads)
            q, k, v = (qkv[:, :, i].reshape(len(x), width) for i in range(3))
            x = x + linear(_reference_heads(q, k, v, heads), block.attn.out_proj)
            x = x + linear(torch.nn.functional.gelu(linear(norm(x, block.ln_2), block.mlp.c_fc)), block.mlp.c_proj)
        values = norm(x @ pool.kv_proj.weight.T, pool.ln_kv)
        table = _reference_sincos(values.shape[1], side)
        w_q, w_k, w_v = pool.attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = pool.attn.in_proj_bias.chunk(3)
        out = _reference_heads((norm(pool.query, pool.ln_q) + table) @ w_q.T + b_q,
                               (values + _reference_resized(table, grid)) @ w_k.T + b_k, values @ w_v.T + b_v,
                               pool.attn.num_heads)
        features.append(norm(linear(out, pool.attn.out_proj), visual.ln_post) @ visual.proj)
    return torch.stack(features)


def test_the_vision_tower_equals_the_official_computation_written_out(tmp_path):
    """The vision tower against the official one written out in the test from its parameters (see
    ``_reference_tower``): an independent reference in every clone, where the official remote code's test runs only
    with ``QWEN_VL_REMOTE_CODE``. A 4 x 4 patch grid, so that both position tables are resized, 2 resampler heads,
    and every parameter drawn at random but the fixed sin-cos table, which is checked against the reference's."""
    model, _, _ = build_tiny_qwen_vl(str(tmp_path), hidden=256, image_size=56)
    visual = model.transformer.visual
    torch.testing.assert_close(visual.attn_pool.pos_embed, _reference_sincos(256, 2), atol=1e-6, rtol=0)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, parameter in visual.named_parameters():
            if name != "attn_pool.pos_embed":
                parameter.normal_(0.0, 0.3)
    assert visual.attn_pool.attn.num_heads == 2 and visual.transformer.resblocks[0].attn.heads == 2
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours, theirs = visual(pixels), _reference_tower(visual, pixels)
    assert ours.shape == (2, 4, 256) and ours.abs().max() > 0.5
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_past_seq_length_the_language_model_scales_its_rotary_base_and_queries_as_the_official_one(tmp_path):
    """Past ``seq_length``, at inference, the official model applies dynamic NTK (the rotary base times
    alpha^(d / (d - 2)), alpha = 2^ceil(log2(L / seq_length) + 1) - 1 for L tokens) and logn attention (the query at
    1-based position p > seq_length times log(p) / log(seq_length)). The Qwen2 reference with its base and queries
    scaled so gives the same logits; in training neither applies."""
    import math

    model = _randomized_tiny_qwen_vl(tmp_path, seq_length=8)
    input_ids = torch.randint(0, 200, (2, 13))
    alpha, d = 3, model.config.kv_channels  # 2^ceil(log2(13 / 8) + 1) - 1
    assert ntk_alpha_for(13, 8) == alpha
    logn_T = torch.tensor([math.log(p, 8) if p > 8 else 1.0 for p in range(1, 14)])
    qwen2 = _as_qwen2(model, rope_theta=model.config.rotary_emb_base * alpha ** (d / (d - 2)))
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda module, args, q: q * logn_T[None, :, None])
             for layer in qwen2.model.layers]  # a per-position scale commutes with the rotation that follows
    with torch.no_grad():
        ours, theirs = model(input_ids=input_ids).logits, qwen2(input_ids=input_ids).logits
        for hook in hooks:
            hook.remove()
        plain = _as_qwen2(model)(input_ids=input_ids).logits
        model.train()  # no dropout in the tiny config: in training only NTK and logn are off
        trained = model(input_ids=input_ids, use_cache=False).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (ours - plain).abs().max() > 1e-2  # the scaling changed the logits: the comparison above tests it
    torch.testing.assert_close(trained, plain, atol=1e-4, rtol=1e-4)


def test_the_image_processor_equals_transformers_clip_processor_set_as_the_official_transform():
    """The official ``visual.py`` transform is Resize((448, 448), bicubic), ToTensor, Normalize(CLIP mean, std): in
    transformers that is the CLIP image processor without its centre crop, an independent implementation in every
    clone. Equal on a non-square photo, a greyscale one and one with an alpha channel, which the official code converts
    with PIL's ``convert("RGB")`` (the alpha dropped) where transformers composites it onto white first."""
    import numpy as np
    from transformers import CLIPImageProcessorPil
    from transformers.image_utils import PILImageResampling

    from sc_tune.models.qwen_vl.image_processing import CLIP_MEAN, CLIP_STD

    clip = CLIPImageProcessorPil(size={"height": 448, "width": 448}, do_center_crop=False,
                                 resample=PILImageResampling.BICUBIC, image_mean=list(CLIP_MEAN),
                                 image_std=list(CLIP_STD), do_convert_rgb=True)
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073) and CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 256, (123, 317, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (500, 90), dtype=np.uint8)),  # greyscale, taller than wide
              Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8))]  # RGBA
    ours = QWenVLImageProcessor()(photos)
    theirs = torch.from_numpy(np.stack([clip(photo.convert("RGB") if photo.mode == "RGBA" else photo,
                                             return_tensors="np")["pixel_values"][0] for photo in photos]))
    assert ours.shape == (3, 3, 448, 448)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_the_vision_tower_refuses_pixels_of_another_shape_naming_the_one_it_takes(tiny):
    visual = tiny[0].transformer.visual
    size = visual.image_size
    assert visual(torch.zeros(1, 3, size, size)).shape[0] == 1
    for wrong in ((1, 4, size, size), (1, 3, size, size + 14), (3, size, size)):
        with pytest.raises(ValueError, match=rf"must be \(N, 3, {size}, {size}\) pixel tensors, got \({wrong[0]}, "):
            visual(torch.zeros(wrong))


def test_image_spans_that_do_not_match_the_images_are_refused_by_count(tiny):
    model, adapter = tiny
    red, green = _images(adapter)
    ids = adapter.encode_prompt("The picture <img></img> is", red)
    start = ids.index(adapter.img_start_id)
    end = start + adapter.tokenizer.image_token_span + 1  # </img>
    span = ids[start: end + 1]
    pixels = torch.cat([red.tensors["images"], green.tensors["images"]])
    cases = {"1 <img> and 0 </img> tokens for 1 images": (ids[:end] + ids[end + 1:], pixels[:1]),
             "0 <img> and 1 </img> tokens for 1 images": (ids[:start] + ids[start + 1:], pixels[:1]),
             "2 <img> and 2 </img> tokens for 1 images": (ids + span, pixels[:1]),
             "1 <img> and 1 </img> tokens for 2 images": (ids, pixels)}
    short = ids[:start + 1] + ids[start + 2:]  # one placeholder fewer inside the span
    cases[rf"the <img> span at row 0, column {start} has 3 positions \(or ends in another row\); the model expects 4"] = (
        short, pixels[:1])
    for message, (row, images) in cases.items():
        with pytest.raises(ValueError, match=message):
            model(input_ids=torch.tensor([row]), images=images)
    assert model(input_ids=torch.tensor([ids + span]), images=pixels).logits.shape[1] == len(ids + span)


def test_the_official_config_builds_the_released_checkpoints_tensor_sizes():
    """Qwen-VL-Chat's config (the defaults) builds tensors of exactly the released checkpoint's size: its
    ``pytorch_model.bin.index.json`` gives ``total_size`` 19,313,870,336 bytes (bf16: 2 bytes per element), as the
    release on the Hugging Face hub and its copy in the reference SC-Tune repository (``Qwen-VL-Chat/``) both carry it.
    A shape rule changed anywhere (the ViT's MLP width, the SwiGLU's half width, the resampler's tables) moves it."""
    from sc_tune.models.qwen_vl.configuration import QWenConfig

    with torch.device("meta"):
        model = QWenLMHeadModel(QWenConfig())
    assert 2 * sum(t.numel() for t in model.state_dict().values()) == 19_313_870_336


def test_the_resamplers_fixed_positions_never_train(tiny_dir):
    """The official resampler's sin-cos table is frozen; the checkpoint stores it. After loading, and with fix_vit
    leaving the rest of the resampler training, a full fine-tuning step moves the resampler's queries, never the
    table (a parameter made frozen came back trainable from from_pretrained, and the step moved it)."""
    from sc_tune.modeling import freeze_vision_tower

    model = QWenLMHeadModel.from_pretrained(tiny_dir, dtype=torch.float32)
    freeze_vision_tower(model, QwenVLAdapter.from_pretrained(tiny_dir))
    pool = model.transformer.visual.attn_pool
    table, queries = pool.pos_embed.detach().clone(), pool.query.detach().clone()
    size = model.transformer.visual.image_size
    model.transformer.visual(torch.randn(2, 3, size, size)).square().mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    assert not torch.equal(pool.query, queries)
    assert torch.equal(pool.pos_embed, table)


def test_past_seq_length_cached_decoding_keeps_the_prompts_ntk_alpha(tmp_path):
    """The official model computes the NTK factor at the prompt's prefill and keeps it for the tokens generated after
    (stored on the cache here): within the same factor's range (a 13-token prompt past seq_length 8: alpha 3 up to 16
    tokens) the greedy tokens and every step's logits with the cache equal those of full recomputation."""
    model = _randomized_tiny_qwen_vl(tmp_path, seq_length=8)
    input_ids = torch.randint(0, 200, (2, 13))
    settings = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "pad_token_id": 0,
                "suppress_tokens": list(range(200, model.config.vocab_size)),  # plain text only: no <img> span
                "return_dict_in_generate": True, "output_logits": True}
    with torch.no_grad():
        cached = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **settings)
        recomputed = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False,
                                    **settings)
    assert cached.sequences.shape == (2, 16) and torch.equal(cached.sequences, recomputed.sequences)
    for step_cached, step_recomputed in zip(cached.logits, recomputed.logits, strict=True):  # every step's logits
        torch.testing.assert_close(step_cached, step_recomputed, atol=1e-4, rtol=1e-4)


def test_a_config_the_official_attention_cannot_split_is_refused_naming_the_fields():
    from sc_tune.models.qwen_vl.configuration import DEFAULT_VISUAL, QWenConfig

    def visual(output_dim):
        return {**DEFAULT_VISUAL, "output_dim": output_dim}

    QWenConfig(hidden_size=256, num_attention_heads=2, kv_channels=128, visual=visual(256))
    for fields, message in (
            ({"hidden_size": 256, "num_attention_heads": 2, "kv_channels": 64, "visual": visual(256)},
             r"kv_channels \* num_attention_heads \(64 \* 2\) must equal hidden_size \(256\)"),
            ({"hidden_size": 256, "num_attention_heads": 2, "kv_channels": 128, "visual": visual(128)},
             r"visual.output_dim \(128\) must equal hidden_size \(256\) and be >= 128"),
            ({"hidden_size": 64, "num_attention_heads": 1, "kv_channels": 64, "visual": visual(64)},
             r"visual.output_dim \(64\) must equal hidden_size \(64\) and be >= 128")):
        with pytest.raises(ValueError, match=message):
            QWenConfig(**fields)


# Qwen-VL-Chat's released generation_config.json (its transformers_version aside) and tokenizer_config.json.
RELEASED_GENERATION_CONFIG = {"chat_format": "chatml", "do_sample": True, "eos_token_id": 151643, "max_new_tokens": 512,
                              "max_window_size": 6144, "pad_token_id": 151643, "top_k": 0, "top_p": 0.3}
RELEASED_TOKENIZER_CONFIG = {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
                             "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}


def _saved_folder(path, **config):
    """What ``save_pretrained`` leaves: a config.json (transformers 5 writes ``dtype``) and a generic tokenizer's
    files."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "qwen", **config}, f)
    for name in ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja"):
        with open(os.path.join(path, name), "w") as f:
            f.write("{}")
    return str(path)


def _read(path, name):
    return read_json(os.path.join(path, name))


def test_the_export_completes_a_saved_folder_as_the_official_release_lays_it_out(tiny_dir, tmp_path):
    import warnings

    from sc_tune.models.qwen_vl.export import OFFICIAL_AUTO_MAP, REMOTE_CODE_FILES, finalize_export

    tok = QWenTokenizer.from_pretrained(tiny_dir, image_token_span=4)
    # No source folder (a tiny model): everything is written, the end-of-document id the tokenizer's (not the
    # config's), the released values otherwise; the remote code is missing, by name, and said.
    out = _saved_folder(tmp_path / "written", dtype="bfloat16", eos_token_id=7)
    with pytest.warns(UserWarning, match="has no configuration_qwen.py, modeling_qwen.py, .* official demos") as said:
        report = finalize_export(out, None, tokenizer=tok)
    assert len(said) == 1 and report["missing_remote_code"] == list(REMOTE_CODE_FILES)
    config = _read(out, "config.json")
    assert config["torch_dtype"] == "bfloat16" and config["architectures"] == ["QWenLMHeadModel"]
    assert config["auto_map"] == OFFICIAL_AUTO_MAP and config["tokenizer_type"] == "QWenTokenizer"
    ids = {"eos_token_id": tok.eod_id, "pad_token_id": tok.eod_id}
    assert _read(out, "generation_config.json") == {**RELEASED_GENERATION_CONFIG, **ids}
    assert _read(out, "tokenizer_config.json") == RELEASED_TOKENIZER_CONFIG
    with open(os.path.join(out, "qwen.tiktoken"), "rb") as mine, open(os.path.join(tiny_dir, "qwen.tiktoken"), "rb") as f:
        assert mine.read() == f.read()
    assert not {"special_tokens_map.json", "added_tokens.json", "chat_template.jinja"} & set(os.listdir(out))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # quiet: the same report, nothing said
        assert finalize_export(_saved_folder(tmp_path / "quiet"), None, tokenizer=tok, quiet=True) == report

    # From a source laid out like the official download: its files are copied, its own leftovers stay, the config's
    # end-of-document id is written where the source has no generation config, a torch_dtype already there is kept.
    source = tmp_path / "source"
    source.mkdir()
    for name in (*REMOTE_CODE_FILES, "SimSun.ttf", "special_tokens_map.json"):
        (source / name).write_text(f"# {name}")
    (source / "qwen.tiktoken").write_bytes(open(os.path.join(tiny_dir, "qwen.tiktoken"), "rb").read())
    (source / "tokenizer_config.json").write_text(json.dumps({**RELEASED_TOKENIZER_CONFIG, "model_max_length": 2048}))
    (source / "config.json").write_text(json.dumps({"auto_map": {"AutoConfig": "their.Config"}}))
    out = _saved_folder(tmp_path / "copied", dtype="bfloat16", torch_dtype="float32", eos_token_id=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = finalize_export(out, str(source))
    assert "missing_remote_code" not in report and report["remote_code"] == [*REMOTE_CODE_FILES, "SimSun.ttf"]
    assert all(open(os.path.join(out, name)).read() == f"# {name}" for name in report["remote_code"])
    config = _read(out, "config.json")
    assert config["torch_dtype"] == "float32" and config["auto_map"] == {"AutoConfig": "their.Config"}
    assert _read(out, "generation_config.json") == {**RELEASED_GENERATION_CONFIG, "eos_token_id": 7, "pad_token_id": 7}
    assert _read(out, "tokenizer_config.json")["model_max_length"] == 2048
    assert "special_tokens_map.json" in os.listdir(out) and "added_tokens.json" not in os.listdir(out)
    finalize_export(_saved_folder(tmp_path / "no_dtype", eos_token_id=7), str(source))
    assert "torch_dtype" not in _read(str(tmp_path / "no_dtype"), "config.json")

    # Nothing to take the end-of-document id or the tokenizer from: refused, naming the file or the folder.
    with pytest.raises(ValueError, match="config.json: no eos_token_id and no tokenizer given"):
        finalize_export(_saved_folder(tmp_path / "no_eos"), None)
    with pytest.raises(ValueError, match="holds no qwen.tiktoken and tokenizer_config.json and no tokenizer was given"):
        finalize_export(_saved_folder(tmp_path / "no_tokenizer", eos_token_id=7), None)
