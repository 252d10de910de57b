"""Converter for the decoder-only MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): round trips from
tiny HF models saved every way, and bad inputs.

The expected trees are built here from each model's in-memory state dict — transformers 5 holds the
experts fused, `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows first) and `mlp.experts.down_proj`
[E, D, F] — independently of `checkpoints_conv.decoder_rules`; `save_pretrained` writes them one by one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch

import hf_fixtures as hf
from checkpoints_conv import ConversionError, convert
from checkpoints_conv.__main__ import main as cli_main
from checkpoints_conv.export import hf_decoder_state_dict
from swapmoe_jax import checkpoint as ckpt
from swapmoe_jax.models.decoder.config import DecoderConfig
from swapmoe_jax.models.switch.config import SwitchConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# case: (family, source format, HF config overrides, how it is converted)
# "bin" and "sharded_bin" are `torch.save`s of the in-memory state dict: fused experts, and for Mixtral the
# in-memory `mlp.` prefix instead of `block_sparse_moe.`; tied Qwen2-MoE's holds lm_head.weight too.
CASES = {
    "mixtral-safetensors": ("mixtral", "safetensors", {}, "function"),
    "mixtral-bin": ("mixtral", "bin", {}, "function"),
    "qwen2_moe-sharded": ("qwen2_moe", "sharded", {}, "cli"),
    "qwen2_moe-bin": ("qwen2_moe", "bin", {}, "function"),
    "qwen3_moe-safetensors": ("qwen3_moe", "safetensors", dict(attention_bias=True), "function"),
    "olmoe-sharded_bin": ("olmoe", "sharded_bin", {}, "subprocess"),
}


@pytest.fixture(scope="module")
def models():
  return {case: hf.make_decoder_model(family, seed=7, **kw) for case, (family, _, kw, _) in CASES.items()}


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory):
  """case -> HF folder, written once; the tests never modify these."""
  root = tmp_path_factory.mktemp("hf")
  return {case: hf.save_hf(models[case], root / case, fmt=CASES[case][1]) for case in CASES}


def run_converter(src: str, out, via: str = "function", *extra: str) -> str:
  out = os.fspath(out)
  if via == "function":
    return convert(src, out, progress=False, dtype=extra[0] if extra else "float32")
  if via == "cli":  # the output folder positionally
    assert cli_main(["--hf", src, out, "--quiet", *extra]) == 0
  else:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "checkpoints_conv", "--hf", src, "--out", out, *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}: ")
  return out


def expected_dense(model) -> dict:
  sd, cfg = hf.state_dict_numpy(model), model.config
  tree = {"embed": sd["model.embed_tokens.weight"], "final_norm": sd["model.norm.weight"]}
  if not cfg.tie_word_embeddings:
    tree["lm_head"] = sd["lm_head.weight"].T
  gated = lambda p: np.concatenate([sd[f"{p}.gate_proj.weight"], sd[f"{p}.up_proj.weight"]]).T  # noqa: E731
  blocks = {}
  for i in range(cfg.num_hidden_layers):
    p = f"model.layers.{i}"
    attn = {x: sd[f"{p}.self_attn.{x}_proj.weight"].T for x in "qkvo"}
    attn |= {f"{x}_b": sd[f"{p}.self_attn.{x}_proj.bias"] for x in "qkvo" if f"{p}.self_attn.{x}_proj.bias" in sd}
    attn |= {f"{x}_norm": sd[f"{p}.self_attn.{x}_norm.weight"] for x in "qk" if f"{p}.self_attn.{x}_norm.weight" in sd}
    b = {"attn_norm": sd[f"{p}.input_layernorm.weight"], "attn": attn,
         "ffn_norm": sd[f"{p}.post_attention_layernorm.weight"]}
    if f"{p}.mlp.gate.weight" in sd:
      b["router"] = {"w": sd[f"{p}.mlp.gate.weight"].T}
      if f"{p}.mlp.shared_expert_gate.weight" in sd:
        b["shared"] = {"wi": gated(f"{p}.mlp.shared_expert"), "wo": sd[f"{p}.mlp.shared_expert.down_proj.weight"].T,
                       "gate": sd[f"{p}.mlp.shared_expert_gate.weight"].T}
    else:
      b["mlp"] = {"wi": gated(f"{p}.mlp"), "wo": sd[f"{p}.mlp.down_proj.weight"].T}
    blocks[str(i)] = b
  tree["blocks"] = blocks
  return tree


def expected_experts(model, block: int) -> tuple[np.ndarray, np.ndarray]:
  """(wi [E, D, 2F], wo [E, F, D]) of block `block`, from the fused in-memory tensors."""
  sd = hf.state_dict_numpy(model)
  p = f"model.layers.{block}.mlp.experts"
  return sd[f"{p}.gate_up_proj"].transpose(0, 2, 1), sd[f"{p}.down_proj"].transpose(0, 2, 1)


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    out |= flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v}
  return out


def assert_trees_equal(got: dict, want: dict, dtype=np.float32) -> None:
  got, want = flatten(got), flatten(want)
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == dtype, k
    np.testing.assert_array_equal(got[k], np.asarray(want[k]).astype(dtype), err_msg=k)


def read_hf_config(folder: str) -> dict:
  with open(os.path.join(folder, "config.json")) as f:
    return json.load(f)


# --- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(models, saved, tmp_path, case):
  family, _, _, via = CASES[case]
  model = models[case]
  out = run_converter(saved[case], tmp_path / "out", via)
  meta = ckpt.read_metadata(out)
  hf_config = read_hf_config(saved[case])
  cfg = DecoderConfig.from_hf_dict(hf_config)
  assert isinstance(meta.config, DecoderConfig) and meta.config == cfg and meta.config.model_type == family
  assert meta.hf_config == hf_config and meta.dtype == "float32" and meta.format_version == ckpt.FORMAT_VERSION
  with open(os.path.join(out, ckpt.METADATA_FILE)) as f:
    written = json.load(f)
  assert written["family"] == "decoder" and written["model_type"] == family
  assert written["source"] == saved[case]
  names = model.state_dict()
  sparse = [i for i in range(model.config.num_hidden_layers) if f"model.layers.{i}.mlp.gate.weight" in names]
  assert meta.moe_layers == tuple(("decoder", i) for i in sparse) == cfg.moe_layers
  assert sorted(os.listdir(os.path.join(out, ckpt.EXPERTS_DIR))) == [f"decoder_{i:03d}" for i in sparse]
  assert_trees_equal(ckpt.restore_dense(meta), expected_dense(model))
  all_experts = ckpt.restore_all_experts(meta)
  norms = np.zeros((len(sparse), cfg.num_experts), np.float32)
  for layer, (block, (wi, wo)) in enumerate(zip(sparse, all_experts)):
    want_wi, want_wo = expected_experts(model, block)
    assert wi.dtype == np.float32 and wi.shape == (cfg.num_experts, cfg.hidden_size, 2 * cfg.moe_d_ff)
    np.testing.assert_array_equal(wi, want_wi)
    np.testing.assert_array_equal(wo, want_wo)
    sumsq = lambda w: (w.astype(np.float64) ** 2).sum((1, 2))  # noqa: E731
    norms[layer] = np.sqrt(sumsq(want_wi) + sumsq(want_wo))
  assert meta.expert_norms.dtype == np.float32
  np.testing.assert_allclose(meta.expert_norms, norms, rtol=1e-6)
  assert len(set(meta.expert_norms.ravel().tolist())) == meta.expert_norms.size


@pytest.mark.parametrize("case", ["mixtral-safetensors", "qwen3_moe-safetensors"])
def test_saved_names_and_export(saved, tmp_path, case):
  """The per-expert tensors `save_pretrained` writes land where the fused in-memory ones say (Mixtral's w1
  is the gate: the first F columns of wi, w3 the up, w2 the down), and the export gives the file back."""
  prefix, (gate, up, down) = {"mixtral-safetensors": ("block_sparse_moe", ("w1", "w3", "w2")),
                              "qwen3_moe-safetensors": ("mlp", ("gate_proj", "up_proj", "down_proj"))}[case]
  state = {k: v.numpy() for k, v in safetensors.torch.load_file(os.path.join(saved[case], "model.safetensors")).items()}
  meta = ckpt.read_metadata(convert(saved[case], tmp_path / "out", progress=False))
  block = meta.moe_layers[-1][1]
  wi, wo = ckpt.restore_experts(meta, len(meta.moe_layers) - 1, [3])
  F = meta.config.moe_d_ff
  t = lambda name: state[f"model.layers.{block}.{prefix}.experts.3.{name}.weight"].T  # noqa: E731
  np.testing.assert_array_equal(wi[0, :, :F], t(gate))
  np.testing.assert_array_equal(wi[0, :, F:], t(up))
  np.testing.assert_array_equal(wo[0], t(down))
  experts = {b: dict(zip(("wi", "wo"), ckpt.restore_experts(meta, n))) for n, (_, b) in enumerate(meta.moe_layers)}
  exported = hf_decoder_state_dict(meta.config, ckpt.restore_dense(meta), experts)
  assert sorted(exported) == sorted(state)
  for name, x in state.items():
    np.testing.assert_array_equal(exported[name], x, err_msg=name)


def test_expert_norm_is_frobenius_of_the_hf_expert(models, saved, tmp_path):
  model = models["qwen2_moe-sharded"]
  meta = ckpt.read_metadata(convert(saved["qwen2_moe-sharded"], tmp_path / "out", progress=False))
  experts = model.model.layers[2].mlp.experts
  want = torch.sqrt(experts.gate_up_proj[1].double().norm() ** 2 + experts.down_proj[1].double().norm() ** 2)
  assert meta.expert_norms[meta.moe_layers.index(("decoder", 2)), 1] == pytest.approx(want.item(), rel=1e-6)


def test_bfloat16(models, saved, tmp_path):
  case = "mixtral-safetensors"
  f32 = ckpt.read_metadata(convert(saved[case], tmp_path / "f32", progress=False))
  meta = ckpt.read_metadata(convert(saved[case], tmp_path / "bf16", dtype="bfloat16", progress=False))
  assert meta.dtype == "bfloat16"
  # float32 -> bfloat16 rounding (nearest even) is the same in torch and ml_dtypes.
  want = {k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in flatten(expected_dense(models[case])).items()}
  got = flatten(ckpt.restore_dense(meta))
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  wi, wo = ckpt.restore_experts(meta, 1, [2, 0])
  want_wi, want_wo = expected_experts(models[case], 1)
  np.testing.assert_array_equal(wi, want_wi[[2, 0]].astype(ml_dtypes.bfloat16))
  np.testing.assert_array_equal(wo, want_wo[[2, 0]].astype(ml_dtypes.bfloat16))
  np.testing.assert_array_equal(meta.expert_norms, f32.expert_norms)  # from the float32 source


def test_chat_tokenizer_and_generation_config_copied(saved, tmp_path):
  src = copy_source(saved["mixtral-safetensors"], tmp_path / "src")
  names = hf.add_chat_tokenizer(src)
  meta = ckpt.read_metadata(convert(src, tmp_path / "out", progress=False))
  assert sorted(os.listdir(meta.tokenizer_dir)) == sorted(names)
  for name in names + [ckpt.GENERATION_CONFIG_FILE]:
    copied = os.path.join(meta.tokenizer_dir if name in names else meta.folder, name)
    with open(os.path.join(src, name)) as a, open(copied) as b:
      assert a.read() == b.read(), name
  import transformers

  tok = transformers.AutoTokenizer.from_pretrained(meta.tokenizer_dir)
  assert tok.chat_template is not None
  text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
  assert text == "<|user|>hi\n"


def test_switch_metadata_without_family_reads_as_switch(tmp_path):
  """Folders written before the decoder families have no "family": they are Switch checkpoints."""
  cfg = SwitchConfig(d_model=8, d_ff=16, num_experts=2, num_layers=2, num_decoder_layers=2, vocab_size=8,
                     d_kv=4, num_heads=2)
  expert = {"wi": np.zeros((8, 16), np.float32), "wo": np.zeros((16, 8), np.float32)}
  os.makedirs(tmp_path / "experts")
  for stack, i in cfg.moe_layers:
    ckpt.save_tree(tmp_path / "experts" / ckpt.layer_dirname(stack, i), {"e0000": expert, "e0001": expert})
  os.makedirs(tmp_path / "dense")
  ckpt.write_metadata(tmp_path, config=cfg, dtype="float32", hf_config={}, source="synthetic", has_tokenizer=False,
                      expert_norms=np.ones((cfg.num_moe_layers, 2), np.float32))
  path = tmp_path / ckpt.METADATA_FILE
  meta = json.loads(path.read_text())
  assert meta["family"] == "switch" and meta["model_type"] == "switch_transformers"
  path.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("family", "model_type")}))
  assert ckpt.read_metadata(tmp_path).config == cfg
  assert ckpt.restore_experts(ckpt.read_metadata(tmp_path), 0, [1])[0].shape == (1, 8, 16)
  path.write_text(json.dumps(meta | {"family": "gpt"}))
  with pytest.raises(ckpt.CheckpointError, match=r"unknown family 'gpt' in .*swapmoe\.json; known: switch, decoder"):
    ckpt.read_metadata(tmp_path)
  path.write_text(json.dumps(meta | {"model_type": "mixtral"}))
  with pytest.raises(ckpt.CheckpointError, match=r"'model_type' is 'mixtral', its config says 'switch_transformers'"):
    ckpt.read_metadata(tmp_path)


# --- bad inputs ----------------------------------------------------------------------------------

def copy_source(src: str, dst) -> str:
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


def _config(**changes):
  return lambda folder: edit_config(folder, **changes)


def _tensors(edit):
  return lambda folder: rewrite_safetensors(folder, edit)


def _drop(*names):
  return _tensors(lambda s: [s.pop(n) for n in names])


def _drop_shard(folder):
  with open(os.path.join(folder, "model.safetensors.index.json")) as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[1]
  os.remove(os.path.join(folder, shard))


def _truncate(folder):
  path = os.path.join(folder, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)


_X = "model.layers.1.block_sparse_moe.experts"

# name: (case, edit of a copy of the source, error pattern)
BAD_SOURCES = {
    "unsupported model_type": ("mixtral-safetensors", _config(model_type="llama"),
                               r"unsupported model_type 'llama' .*supported: "
                               r"SwitchTransformersForConditionalGeneration \(model_type switch_transformers\), "
                               r"MixtralForCausalLM \(model_type mixtral\), Qwen2MoeForCausalLM \(model_type qwen2_moe\), "
                               r"Qwen3MoeForCausalLM \(model_type qwen3_moe\), OlmoeForCausalLM \(model_type olmoe\)"),
    "unsupported architecture": ("mixtral-safetensors", _config(architectures=["MixtralForSequenceClassification"]),
                                 r"unsupported architecture \['MixtralForSequenceClassification'\] for model_type "
                                 r"'mixtral'; supported: MixtralForCausalLM"),
    "missing shard": ("qwen2_moe-sharded", _drop_shard, r"missing shard .*model-00002-of-\d+\.safetensors"),
    "truncated safetensors": ("mixtral-safetensors", _truncate,
                              r"truncated or corrupt safetensors file .*model\.safetensors"),
    "unknown tensor": ("mixtral-safetensors", _tensors(lambda s: s.update({"model.foo.weight": torch.zeros(3)})),
                       r"unknown tensor model\.foo\.weight in .*model\.safetensors: not a mixtral weight"),
    "shape mismatch": ("mixtral-safetensors",
                       _tensors(lambda s: s.update({"model.layers.2.self_attn.k_proj.weight": torch.zeros(32, 32)})),
                       r"shape mismatch for model\.layers\.2\.self_attn\.k_proj\.weight in .*model\.safetensors: the "
                       r"file has \[32, 32\], config\.json implies \[16, 32\]"),
    "missing tensor": ("mixtral-safetensors", _drop("model.norm.weight"), r"missing tensor model\.norm\.weight in "),
    "missing expert matrix": ("mixtral-safetensors", _drop(f"{_X}.2.w3.weight"),
                              r"missing tensor: the up matrix of expert 2 of block 1 "
                              r"\(model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight\) in "),
    "missing last expert": ("mixtral-safetensors", _drop(*(f"{_X}.3.{w}.weight" for w in ("w1", "w2", "w3"))),
                            r"expert count mismatch: config\.json says num_experts=4, but the weights in .* have 3 "
                            r"experts in block 1"),
    "no experts in a block": ("mixtral-safetensors",
                              _drop(*(f"{_X}.{j}.{w}.weight" for j in range(4) for w in ("w1", "w2", "w3"))),
                              r"missing tensor model\.layers\.1\.block_sparse_moe\.experts\.0\.w1\.weight \(or the "
                              r"fused experts\.gate_up_proj and experts\.down_proj\) in .*: block 1 has no experts"),
    "fewer experts than config": ("mixtral-safetensors", _config(num_local_experts=8),
                                  r"expert count mismatch: .*block_sparse_moe\.gate\.weight in .* has 4 experts, "
                                  r"config\.json says num_experts=8"),
    "more experts than config": ("mixtral-safetensors", _config(num_local_experts=2),
                                 r"expert count mismatch: .*num_experts=2"),
    "more fused experts than config": ("mixtral-bin", _config(num_local_experts=3),
                                       r"expert count mismatch: model\.layers\.0\.mlp\.gate\.weight in "
                                       r".*pytorch_model\.bin has 4 experts, config\.json says num_experts=3"),
    "dense weights in a sparse block": ("qwen2_moe-sharded", _config(mlp_only_layers=[]),
                                        r"unexpected tensor model\.layers\.1\.mlp\.\w+_proj\.weight in .*: "
                                        r"config\.json makes block 1 sparse \(sparse blocks: \[0, 1, 2\]\)"),
    "bias not in config": ("qwen2_moe-sharded", _config(qkv_bias=False),
                           r"unexpected tensor model\.layers\.\d\.self_attn\.[qkv]_proj\.bias in .*attention bias"),
    "experts both one by one and fused": (
        "mixtral-safetensors",
        _tensors(lambda s: s.update({f"{_X}.gate_up_proj": torch.zeros(4, 48, 32)})),
        r"tensor model\.layers\.1\.block_sparse_moe\.experts\.gate_up_proj gives the gate matrix of expert 0 of "
        r"block 1 again \(already from model\.layers\.1\.block_sparse_moe\.experts\.0\.w1\.weight\)"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source(saved, tmp_path, case):
  source, edit, pattern = BAD_SOURCES[case]
  src = copy_source(saved[source], tmp_path / "src")
  edit(src)
  with pytest.raises(ConversionError, match=pattern) as info:
    convert(src, tmp_path / "out" / "model", progress=False)
  assert "\n" not in str(info.value)
  assert not os.path.exists(tmp_path / "out")  # nothing left, not even the parent folder it created


def test_cli_error_names_the_missing_shard(saved, tmp_path, capsys):
  src = copy_source(saved["qwen2_moe-sharded"], tmp_path / "src")
  _drop_shard(src)
  assert cli_main(["--hf", src, str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: missing shard ") and "model-00002-of-" in err and len(err.splitlines()) == 1
  with pytest.raises(SystemExit) as info:  # argparse: the output folder given twice
    cli_main(["--hf", src, "--out", str(tmp_path / "a"), str(tmp_path / "b")])
  assert info.value.code == 2 and "give the output folder once" in capsys.readouterr().err
