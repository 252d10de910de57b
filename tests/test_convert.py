"""Converter and checkpoint format: round trips from every HF source format, and every bad input.

The expected trees are built here from HF names by hand, independently of `checkpoints_conv.rules`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import hf_fixtures as hf
from checkpoints_conv import ConversionError, convert, resolve_source
from checkpoints_conv import rules
from checkpoints_conv.__main__ import main as cli_main
from swapmoe_jax import checkpoint as ckpt
from swapmoe_jax.models.switch.config import SwitchConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every block sparse and tied (the fixture default), or block 0 dense + block 1 sparse, untied, router
# bias, and H*C = 24 != D = 32 so that a swapped q/o layout cannot pass unnoticed.
VARIANTS = {
    "sparse": {},
    "mixed": dict(num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, tie_word_embeddings=False,
                  router_bias=True, d_kv=6),
}


@pytest.fixture(scope="module")
def models():
  return {name: hf.make_hf_model(hf.tiny_config(**kw), seed=3) for name, kw in VARIANTS.items()}


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory):
  """(variant, fmt) -> HF folder, written once; the tests never modify these."""
  root = tmp_path_factory.mktemp("hf")
  return {(v, fmt): hf.save_hf(models[v], root / f"{v}-{fmt}", fmt=fmt, tokenizer=(v == "sparse"))
          for v in VARIANTS for fmt in hf.FORMATS}


@pytest.fixture(scope="module")
def sparse_meta(saved, tmp_path_factory):
  """The "sparse" model converted from safetensors once, for tests that only read it."""
  out = convert(saved["sparse", "safetensors"], tmp_path_factory.mktemp("conv") / "out", progress=False)
  return ckpt.read_metadata(out)


def expected_dense(sd: dict[str, np.ndarray], cfg: SwitchConfig) -> dict:
  t = lambda name: sd[name].T  # noqa: E731
  tree = {"shared": sd["shared.weight"]}
  if not cfg.tie_word_embeddings:
    tree["lm_head"] = t("lm_head.weight")
  for stack, n, sparse, ffn in (("encoder", cfg.num_layers, cfg.encoder_sparse_layers, 1),
                                ("decoder", cfg.num_decoder_layers, cfg.decoder_sparse_layers, 2)):
    blocks = {}
    for i in range(n):
      p = f"{stack}.block.{i}.layer"
      b = {"attn_norm": sd[f"{p}.0.layer_norm.weight"],
           "attn": {x: t(f"{p}.0.SelfAttention.{x}.weight") for x in "qkvo"},
           "ffn_norm": sd[f"{p}.{ffn}.layer_norm.weight"]}
      if stack == "decoder":
        b["cross_norm"] = sd[f"{p}.1.layer_norm.weight"]
        b["cross"] = {x: t(f"{p}.1.EncDecAttention.{x}.weight") for x in "qkvo"}
      if i in sparse:
        b["router"] = {"w": t(f"{p}.{ffn}.mlp.router.classifier.weight")}
        if cfg.router_bias:
          b["router"]["b"] = sd[f"{p}.{ffn}.mlp.router.classifier.bias"]
      else:
        b["mlp"] = {"wi": t(f"{p}.{ffn}.mlp.wi.weight"), "wo": t(f"{p}.{ffn}.mlp.wo.weight")}
      blocks[str(i)] = b
    tree[stack] = {"rel_bias": sd[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
                   "final_norm": sd[f"{stack}.final_layer_norm.weight"], "blocks": blocks}
    if not cfg.tie_word_embeddings:  # transformers 5: untied stacks have their own input embeddings
      tree[stack]["embed"] = sd[f"{stack}.embed_tokens.weight"]
  return tree


def expected_experts(sd: dict[str, np.ndarray], cfg: SwitchConfig, layer: int) -> tuple[np.ndarray, np.ndarray]:
  stack, i = cfg.moe_layers[layer]
  p = f"{stack}.block.{i}.layer.{1 if stack == 'encoder' else 2}.mlp.experts.expert_"
  wi = np.stack([sd[f"{p}{j}.wi.weight"].T for j in range(cfg.num_experts)])
  wo = np.stack([sd[f"{p}{j}.wo.weight"].T for j in range(cfg.num_experts)])
  return wi, wo


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out |= flatten(v, f"{prefix}{k}/")
    else:
      out[prefix + k] = v
  return out


def assert_trees_equal(got: dict, want: dict, dtype=np.float32) -> None:
  got, want = flatten(got), flatten(want)
  assert sorted(got) == sorted(want)
  for k in want:
    assert isinstance(got[k], np.ndarray), k
    assert got[k].dtype == dtype, k
    np.testing.assert_array_equal(got[k], np.asarray(want[k]).astype(dtype), err_msg=k)


def assert_nothing_left(out) -> None:
  """No output folder and no temporary or backup folder next to it."""
  out = os.fspath(out)
  parent, name = os.path.dirname(out), os.path.basename(out)
  left = [f for f in os.listdir(parent) if f == name or f.startswith(name + ".")] if os.path.isdir(parent) else []
  assert left == []


# --- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fmt", hf.FORMATS)
def test_round_trip(models, saved, tmp_path, fmt, variant):
  model = models[variant]
  sd = hf.state_dict_numpy(model)
  out = convert(saved[variant, fmt], tmp_path / "out", progress=False)
  assert out == str(tmp_path / "out")
  meta = ckpt.read_metadata(out)
  cfg = SwitchConfig.from_hf_dict(model.config.to_dict())
  assert meta.config == cfg and meta.dtype == "float32" and meta.format_version == ckpt.FORMAT_VERSION
  assert meta.moe_layers == cfg.moe_layers
  assert len(meta.moe_layers) == (4 if variant == "sparse" else 2)
  assert meta.hf_config["model_type"] == "switch_transformers"
  with open(os.path.join(out, ckpt.METADATA_FILE)) as f:
    assert json.load(f)["source"] == saved[variant, fmt]
  assert_trees_equal(ckpt.restore_dense(meta), expected_dense(sd, cfg))
  all_experts = ckpt.restore_all_experts(meta)
  assert len(all_experts) == cfg.num_moe_layers
  norms = np.zeros((cfg.num_moe_layers, cfg.num_experts), np.float32)
  for layer, (wi, wo) in enumerate(all_experts):
    want_wi, want_wo = expected_experts(sd, cfg, layer)
    assert wi.shape == (cfg.num_experts, cfg.d_model, cfg.d_ff) and wi.dtype == np.float32
    np.testing.assert_array_equal(wi, want_wi)
    np.testing.assert_array_equal(wo, want_wo)
    sumsq = lambda w: (w.astype(np.float64) ** 2).sum((1, 2))  # noqa: E731
    norms[layer] = np.sqrt(sumsq(want_wi) + sumsq(want_wo))
  assert meta.expert_norms.shape == norms.shape and meta.expert_norms.dtype == np.float32
  np.testing.assert_allclose(meta.expert_norms, norms, rtol=1e-6)
  assert len(set(meta.expert_norms.ravel().tolist())) == meta.expert_norms.size  # distinct, not a constant


def test_expert_norm_is_frobenius_of_the_hf_expert(models, sparse_meta):
  model, meta = models["sparse"], sparse_meta
  expert = model.decoder.block[1].layer[2].mlp.experts["expert_2"]
  want = torch.sqrt(expert.wi.weight.double().norm() ** 2 + expert.wo.weight.double().norm() ** 2).item()
  layer = meta.moe_layers.index(("decoder", 1))
  assert meta.expert_norms[layer, 2] == pytest.approx(want, rel=1e-6)


def test_rule_table_lists_exactly_the_hf_tensors(saved):
  for variant, kw in VARIANTS.items():
    path = os.path.join(saved[variant, "safetensors"], "model.safetensors")
    with open(path, "rb") as f:
      names = set(json.loads(f.read(int.from_bytes(f.read(8), "little")))) - {"__metadata__"}
    cfg = SwitchConfig.from_hf_dict(hf.tiny_config(**kw).to_dict())
    tied_copies = {n for n in names if n.endswith("embed_tokens.weight")}
    assert rules.required_names(cfg) == names - tied_copies
    assert len(names) > 50


def test_restore_some_experts(models, sparse_meta):
  sd = hf.state_dict_numpy(models["sparse"])
  meta, cfg = sparse_meta, sparse_meta.config
  want_wi, want_wo = expected_experts(sd, cfg, 2)
  wi, wo = ckpt.restore_experts(meta, 2, [3, 1, 3])
  assert wi.shape == (3, cfg.d_model, cfg.d_ff) and wo.shape == (3, cfg.d_ff, cfg.d_model)
  np.testing.assert_array_equal(wi, want_wi[[3, 1, 3]])
  np.testing.assert_array_equal(wo, want_wo[[3, 1, 3]])
  wi, wo = ckpt.restore_experts(meta, 0, [])
  assert wi.shape == (0, cfg.d_model, cfg.d_ff) and wo.shape == (0, cfg.d_ff, cfg.d_model)
  with pytest.raises(ckpt.CheckpointError, match=r"expert ids \[4\] out of range"):
    ckpt.restore_experts(meta, 0, [0, 4])
  with pytest.raises(ckpt.CheckpointError, match="MoE layer 4 out of range"):
    ckpt.restore_experts(meta, 4)


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_restore_experts_reads_only_those_experts(tmp_path):
  def bytes_read():
    with open("/proc/self/io") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("rchar"))

  cfg = SwitchConfig(d_model=128, d_ff=512, num_experts=8, num_layers=2, num_decoder_layers=2, vocab_size=8,
                     d_kv=8, num_heads=2)
  rng = np.random.default_rng(0)
  layer = {ckpt.expert_key(j): {"wi": rng.standard_normal((128, 512), np.float32),
                                "wo": rng.standard_normal((512, 128), np.float32)} for j in range(8)}
  os.makedirs(tmp_path / "experts")
  for n, (stack, i) in enumerate(cfg.moe_layers):
    ckpt.save_tree(tmp_path / "experts" / ckpt.layer_dirname(stack, i), layer)
  os.makedirs(tmp_path / "dense")
  ckpt.write_metadata(tmp_path, config=cfg, dtype="float32", hf_config={}, source="synthetic", has_tokenizer=False,
                      expert_norms=np.ones((cfg.num_moe_layers, 8), np.float32))
  meta = ckpt.read_metadata(tmp_path)
  start = bytes_read()
  wi, _ = ckpt.restore_experts(meta, 1, [5])
  one = bytes_read() - start
  start = bytes_read()
  ckpt.restore_experts(meta, 1)
  every = bytes_read() - start
  np.testing.assert_array_equal(wi[0], layer["e0005"]["wi"])
  expert_bytes = 2 * 128 * 512 * 4
  assert one < 2 * expert_bytes and every > 6 * expert_bytes  # (OCDBT compresses a little)


def test_bfloat16(models, saved, tmp_path):
  sd = {k: v.detach().to(torch.bfloat16) for k, v in models["mixed"].state_dict().items()}
  f32 = ckpt.read_metadata(convert(saved["mixed", "sharded"], tmp_path / "f32", progress=False))
  bf16 = convert(saved["mixed", "sharded"], tmp_path / "bf16", dtype="bfloat16", progress=False)
  meta = ckpt.read_metadata(bf16)
  assert meta.dtype == "bfloat16"
  # torch's float32 -> bfloat16 rounding (nearest even) is ml_dtypes', bit for bit.
  as_np = {k: v.view(torch.int16).numpy().view(ml_dtypes.bfloat16) for k, v in sd.items()}
  assert_trees_equal(ckpt.restore_dense(meta), expected_dense(as_np, meta.config), dtype=ml_dtypes.bfloat16)
  wi, wo = ckpt.restore_experts(meta, 1, [2])
  want_wi, want_wo = expected_experts(as_np, meta.config, 1)
  assert wi.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(wi[0], want_wi[2])
  np.testing.assert_array_equal(wo[0], want_wo[2])
  # Norms come from the float32 source, not from the rounded weights.
  np.testing.assert_array_equal(meta.expert_norms, f32.expert_norms)


def test_tokenizer_copied_and_loadable(saved, tmp_path):
  meta = ckpt.read_metadata(convert(saved["sparse", "bin"], tmp_path / "out", progress=False))
  assert meta.tokenizer_dir == str(tmp_path / "out" / "tokenizer")
  assert sorted(os.listdir(meta.tokenizer_dir)) == ["spiece.model", "tokenizer.json", "tokenizer_config.json"]
  tok = transformers.AutoTokenizer.from_pretrained(meta.tokenizer_dir)
  ref = hf.load_tokenizer()
  text = "Amanda baked cookies for Jerry."
  assert len(tok) == 96 and tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.unk_token_id == 2
  assert tok(text).input_ids == ref(text).input_ids
  assert tok(text).input_ids[-1] == 1 and max(tok(text).input_ids) < 96
  assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_converted_tiny_fixture(converted_tiny):
  model, folder = converted_tiny(seed=5, fmt="sharded", num_experts=8)
  assert converted_tiny(seed=5, fmt="sharded", num_experts=8)[1] == folder  # cached
  meta = ckpt.read_metadata(folder)
  assert meta.config.num_experts == model.config.num_experts == 8 and meta.tokenizer_dir is not None
  wi, _ = ckpt.restore_experts(meta, 0, [7])
  want = model.encoder.block[0].layer[1].mlp.experts["expert_7"].wi.weight.detach().numpy().T
  np.testing.assert_array_equal(wi[0], want)


def test_no_tokenizer(saved, tmp_path):
  out = convert(saved["mixed", "safetensors"], tmp_path / "out", progress=False)
  meta = ckpt.read_metadata(out)
  assert meta.tokenizer_dir is None and not os.path.exists(os.path.join(out, "tokenizer"))
  assert os.path.isfile(os.path.join(out, "generation_config.json"))  # save_pretrained writes one


# --- bad inputs ----------------------------------------------------------------------------------

def copy_source(src: str, dst) -> str:
  import shutil

  shutil.copytree(src, dst)
  return os.fspath(dst)


def edit_config(folder: str, **changes) -> None:
  path = os.path.join(folder, "config.json")
  with open(path) as f:
    d = json.load(f)
  with open(path, "w") as f:
    json.dump(d | changes, f)


def rewrite_safetensors(folder: str, edit) -> None:
  path = os.path.join(folder, "model.safetensors")
  state = safetensors.torch.load_file(path)
  edit(state)
  safetensors.torch.save_file(state, path, metadata={"format": "pt"})


def _truncate(folder):
  path = os.path.join(folder, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)


def _garble_header(folder):
  with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
    f.seek(8)
    f.write(b"\x00not json")


def _truncate_bin(folder):
  path = os.path.join(folder, "pytorch_model.bin")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _drop_shard(folder):
  with open(os.path.join(folder, "model.safetensors.index.json")) as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[1]
  os.remove(os.path.join(folder, shard))


def _t5_config(folder):
  transformers.T5Config(vocab_size=96, d_model=32).to_json_file(os.path.join(folder, "config.json"))


def _add_unknown(folder):
  rewrite_safetensors(folder, lambda s: s.update({"encoder.foo.weight": torch.zeros(3)}))


def _bad_shape(folder):
  name = "encoder.block.1.layer.0.SelfAttention.q.weight"
  rewrite_safetensors(folder, lambda s: s.update({name: torch.zeros(32, 16)}))


def _drop_final_norm(folder):
  rewrite_safetensors(folder, lambda s: s.pop("decoder.final_layer_norm.weight"))


def _drop_last_expert(folder):
  rewrite_safetensors(folder, lambda s: [s.pop(k) for k in list(s) if ".expert_3." in k])


def _remove(name):
  return lambda folder: os.remove(os.path.join(folder, name))


def _config(**changes):
  return lambda folder: edit_config(folder, **changes)


# name: (variant, fmt, edit of a copy of the source, error pattern)
BAD_SOURCES = {
    "missing config": ("sparse", "safetensors", _remove("config.json"), r"missing .*config\.json"),
    "no weights": ("sparse", "safetensors", _remove("model.safetensors"),
                   r"no weights found in .*: looked for model\.safetensors, model\.safetensors\.index\.json, "
                   r"pytorch_model\.bin, pytorch_model\.bin\.index\.json"),
    "truncated safetensors": ("sparse", "safetensors", _truncate,
                              r"truncated or corrupt safetensors file .*model\.safetensors"),
    "garbled safetensors": ("sparse", "safetensors", _garble_header,
                            r"truncated or corrupt safetensors file .*model\.safetensors"),
    "truncated bin": ("sparse", "bin", _truncate_bin, r"cannot read .*pytorch_model\.bin"),
    "missing shard": ("sparse", "sharded", _drop_shard, r"missing shard .*model-00002-of-\d+\.safetensors"),
    "another architecture": ("sparse", "safetensors", _t5_config,
                             r"unsupported model_type 't5'.*supported: "
                             r"SwitchTransformersForConditionalGeneration"),
    "unknown tensor": ("sparse", "safetensors", _add_unknown,
                       r"unknown tensor encoder\.foo\.weight in .*model\.safetensors"),
    "shape mismatch": ("sparse", "safetensors", _bad_shape,
                       r"shape mismatch for encoder\.block\.1\.layer\.0\.SelfAttention\.q\.weight in "
                       r".*model\.safetensors: the file has \[32, 16\], config\.json implies \[32, 32\]"),
    "missing tensor": ("sparse", "safetensors", _drop_final_norm,
                       r"missing tensor decoder\.final_layer_norm\.weight in "),
    "more experts than config": ("sparse", "safetensors", _config(num_experts=2),
                                 r"expert count mismatch: .*num_experts=2"),
    "fewer experts than config": ("sparse", "safetensors", _config(num_experts=8),
                                  r"expert count mismatch: .*routes to 4 experts, "
                                  r"config\.json says num_experts=8"),
    "missing experts": ("mixed", "safetensors", _drop_last_expert,
                        r"expert count mismatch: .* have 3 experts in"),
    "dense weights in a sparse block": ("mixed", "safetensors", _config(num_sparse_encoder_layers=2),
                                        r"unexpected tensor encoder\.block\.0\.layer\.1\.mlp\.wi\.weight "
                                        r"in .*: config\.json makes encoder block 0 sparse"),
    "router bias not in config": ("mixed", "safetensors", _config(router_bias=False),
                                  r"unexpected tensor .*router\.classifier\.bias .*router_bias=false"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source(saved, tmp_path, case):
  variant, fmt, edit, pattern = BAD_SOURCES[case]
  src = copy_source(saved[variant, fmt], tmp_path / "src")
  edit(src)
  with pytest.raises(ConversionError, match=pattern) as info:
    convert(src, tmp_path / "out" / "model", progress=False)
  assert "\n" not in str(info.value)
  assert_nothing_left(tmp_path / "out" / "model")
  assert not os.path.exists(tmp_path / "out")  # nor the parent folder it would have created


def test_missing_folder(tmp_path):
  with pytest.raises(ConversionError, match=f"no such folder: {tmp_path / 'nope'}"):
    convert(tmp_path / "nope", tmp_path / "out", progress=False)
  assert_nothing_left(tmp_path / "out")


def test_bad_dtype(saved, tmp_path):
  with pytest.raises(ConversionError, match="unknown dtype 'float16'; supported: float32, bfloat16"):
    convert(saved["sparse", "safetensors"], tmp_path / "out", dtype="float16", progress=False)
  assert_nothing_left(tmp_path / "out")


def test_overwrite(saved, models, tmp_path):
  out = tmp_path / "out"
  first = ckpt.read_metadata(convert(saved["sparse", "safetensors"], out, progress=False))
  with pytest.raises(ConversionError, match=f"{out} already exists; pass --overwrite"):
    convert(saved["mixed", "safetensors"], out, progress=False)
  assert ckpt.read_metadata(out).moe_layers == first.moe_layers  # untouched
  # A failing overwrite keeps the old checkpoint.
  bad = copy_source(saved["mixed", "safetensors"], tmp_path / "bad")
  _truncate(bad)
  with pytest.raises(ConversionError, match="truncated"):
    convert(bad, out, progress=False, overwrite=True)
  assert ckpt.read_metadata(out).moe_layers == first.moe_layers
  convert(saved["mixed", "safetensors"], out, progress=False, overwrite=True)
  assert ckpt.read_metadata(out).moe_layers == (("encoder", 1), ("decoder", 1))
  assert sorted(os.listdir(tmp_path)) == ["bad", "out"]  # no temporary or backup folder left
  # --overwrite never deletes a folder that is not a converted checkpoint.
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("keep me")
  with pytest.raises(ConversionError, match="refusing to replace .*not a converted checkpoint"):
    convert(saved["mixed", "safetensors"], other, progress=False, overwrite=True)
  assert (other / "notes.txt").read_text() == "keep me"


def test_hub_unreachable(monkeypatch, tmp_path):
  import huggingface_hub

  def offline(*args, **kwargs):
    raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the hub")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConversionError, match=r"hub is unreachable .*pass its local folder"):
    resolve_source("google/switch-base-8")
  with pytest.raises(ConversionError, match="hub is unreachable"):
    convert("google/switch-base-8", tmp_path / "out", progress=False)
  assert_nothing_left(tmp_path / "out")


def test_hub_download_prefers_safetensors(monkeypatch, saved, tmp_path):
  import huggingface_hub

  calls = []

  def fake(repo_id, revision=None, allow_patterns=()):
    calls.append((repo_id, list(allow_patterns)))
    return saved["sparse", "bin"] if any(p.endswith(".bin") for p in allow_patterns) else str(tmp_path)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
  monkeypatch.chdir(tmp_path)
  # The first call asks for safetensors only; this "repository" has none, so the second asks for .bin.
  assert resolve_source("google/switch-base-8") == saved["sparse", "bin"]
  assert [c[0] for c in calls] == ["google/switch-base-8"] * 2
  assert "model.safetensors" in calls[0][1] and not any(p.endswith(".bin") for p in calls[0][1])
  assert "pytorch_model.bin" in calls[1][1]
  assert {"config.json", "spiece.model", "tokenizer.json"} <= set(calls[0][1])


# --- reader validation ---------------------------------------------------------------------------

@pytest.fixture()
def converted(sparse_meta, tmp_path):
  """A fresh copy of a converted folder, for tests that damage it."""
  return copy_source(sparse_meta.folder, tmp_path / "out")


def _edit_meta(folder, **changes):
  path = os.path.join(folder, ckpt.METADATA_FILE)
  with open(path) as f:
    d = json.load(f)
  with open(path, "w") as f:
    json.dump(d | changes, f)


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: _edit_meta(d, format_version=ckpt.FORMAT_VERSION + 1), r"written by a newer swapmoe_jax"),
    (lambda d: _edit_meta(d, expert_norms=[[1.0] * 4]), r"'expert_norms' in .*swapmoe\.json has shape \(1, 4\), "
     r"but its config has 4 MoE layers of 4 experts"),
    (lambda d: _edit_meta(d, dtype="float16"), r"unknown dtype 'float16' in .*swapmoe\.json"),
    (lambda d: _edit_meta(d, config={"num_experts": 0}), r"bad config in .*swapmoe\.json: num_experts must be"),
    (lambda d: os.remove(os.path.join(d, ckpt.METADATA_FILE)), r"missing .*swapmoe\.json: not a converted"),
    (lambda d: open(os.path.join(d, ckpt.METADATA_FILE), "w").write("{"), r"cannot parse .*swapmoe\.json"),
    (lambda d: os.rename(os.path.join(d, "experts"), os.path.join(d, "x")),
     r"incomplete checkpoint .*no experts/"),
    (lambda d: os.rename(os.path.join(d, "experts", "decoder_001"), os.path.join(d, "x")),
     r"incomplete checkpoint .*no .*experts/decoder_001"),
], ids=["newer", "norms shape", "dtype", "config", "no metadata", "bad json", "no experts", "no layer"])
def test_read_metadata_errors(converted, edit, pattern):
  edit(converted)
  with pytest.raises(ckpt.CheckpointError, match=pattern) as info:
    ckpt.read_metadata(converted)
  assert "\n" not in str(info.value)


def test_is_converted_checkpoint(sparse_meta, saved, tmp_path):
  assert ckpt.is_converted_checkpoint(sparse_meta.folder)
  assert not ckpt.is_converted_checkpoint(saved["mixed", "safetensors"])
  assert not ckpt.is_converted_checkpoint(tmp_path / "nope")
  with pytest.raises(ckpt.CheckpointError, match="no such checkpoint folder"):
    ckpt.read_metadata(tmp_path / "nope")


# --- command line --------------------------------------------------------------------------------

def test_cli_error_is_one_line(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", "checkpoints_conv", "--hf", str(tmp_path / "nope"),
                         "--out", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [f"error: no such folder: {tmp_path / 'nope'}"]
  assert_nothing_left(tmp_path / "out")


def test_cli_converts(saved, tmp_path, capsys):
  assert cli_main(["--hf", saved["sparse", "sharded"], "--out", str(tmp_path / "out"), "--dtype", "bfloat16",
                   "--quiet"]) == 0
  assert capsys.readouterr().out == ""
  assert ckpt.read_metadata(tmp_path / "out").dtype == "bfloat16"
  assert cli_main(["--hf", saved["sparse", "sharded"], "--out", str(tmp_path / "out")]) == 2
  assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'out'} already exists")
