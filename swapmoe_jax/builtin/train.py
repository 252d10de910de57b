"""Trains the built-in default model: a small Switch Transformer on the synthetic tasks of `tasks.py`.

  python -m swapmoe_jax.train --out swapmoe_jax/builtin/assets/default_model     # what shipped (on one GPU)
  python -m swapmoe_jax.train --out /tmp/m --tiny --steps 20             # a smoke run on the CPU

Everything is seeded and the settings are recorded in the output (`TRAINING.json`, with the held-out
exact match reached). Steps:
1. a sentencepiece unigram tokenizer (T5 special ids, digits split) trained on a generated corpus;
2. `SwitchTransformer` (this project's Flax NNX model, every expert resident) trained with optax AdamW
   on teacher-forced cross-entropy plus the Switch load-balancing loss (which spreads tokens over the
   experts, so that experts specialise and residency matters);
3. export to a Hugging Face folder (`checkpoints_conv.export`: the converter's rule table run
   backwards), then conversion with `checkpoints_conv.convert` — the same path as any HF checkpoint;
4. exact match on held-out prompts, measured on the converted checkpoint through `swapmoe_jax.load`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from swapmoe_jax.builtin import tasks
from swapmoe_jax.models.switch.config import SwitchConfig
from swapmoe_jax.models.switch.model import SwitchTransformer
from swapmoe_jax.moe import ExpertSlots, VirtualExpertMoE


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that determines the trained model."""

  seed: int = 0
  steps: int = 6000
  batch_size: int = 256
  peak_lr: float = 2e-3
  warmup_steps: int = 300
  weight_decay: float = 0.01
  aux_loss_coef: float = 0.01
  router_init_std: float = 0.02
  # Expert capacity per batch row while training (Switch trains with a capacity factor and drops the
  # overflow); 4 = 2x the mean load of a 32-token row over 16 experts. Serving uses config.json's 64.
  train_capacity: int = 4
  src_len: int = 32
  tgt_len: int = 24
  tokenizer_pieces: int = 256  # an upper bound: sentencepiece keeps fewer when the corpus has fewer
  tokenizer_corpus: int = 20000
  d_model: int = 128
  d_kv: int = 32
  d_ff: int = 192
  num_heads: int = 4
  num_layers: int = 4
  num_sparse_layers: int = 2
  num_experts: int = 16
  save_dtype: str = "bfloat16"
  eval_examples: int = 1000
  pool_size: int = 3_000_000  # training examples generated and tokenized once; batches are drawn from it
  max_seconds: float = 0.0  # > 0: stop training after this long (the record says how many steps ran)
  init_from: str = ""  # fine-tune: start from this converted checkpoint's weights (and reuse its tokenizer)


TINY = dict(steps=20, batch_size=16, pool_size=2000, d_model=32, d_kv=8, d_ff=32, num_heads=2, num_layers=2,
            num_sparse_layers=1, num_experts=4, tokenizer_corpus=2000, eval_examples=20, save_dtype="float32")


# --- tokenizer ---------------------------------------------------------------------------------
def build_tokenizer(out_dir: str, s: Settings):
  """Trains the sentencepiece tokenizer into `out_dir` (spiece.model + HF files); returns it (HF)."""
  import sentencepiece as spm
  import transformers

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(tasks.corpus(s.tokenizer_corpus, seed=s.seed + 1)), model_writer=model,
      model_type="unigram", vocab_size=s.tokenizer_pieces, hard_vocab_limit=False, split_digits=True,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
      normalization_rule_name="identity", num_threads=1, minloglevel=2)
  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, "spiece.model"), "wb") as f:
      f.write(model.getvalue())
    tok = transformers.T5Tokenizer.from_pretrained(tmp, extra_ids=0)
    tok.save_pretrained(out_dir)
    shutil.copy(os.path.join(tmp, "spiece.model"), os.path.join(out_dir, "spiece.model"))
  return transformers.AutoTokenizer.from_pretrained(out_dir)


# --- model ---------------------------------------------------------------------------------------
def hf_config(s: Settings, vocab_size: int) -> dict:
  """config.json of the model (transformers' SwitchTransformersConfig fields)."""
  return dict(
      architectures=["SwitchTransformersForConditionalGeneration"], model_type="switch_transformers",
      vocab_size=-(-vocab_size // 8) * 8, d_model=s.d_model, d_kv=s.d_kv, d_ff=s.d_ff, num_heads=s.num_heads,
      num_layers=s.num_layers, num_decoder_layers=s.num_layers, num_sparse_encoder_layers=s.num_sparse_layers,
      num_sparse_decoder_layers=s.num_sparse_layers, num_experts=s.num_experts, expert_capacity=64,
      router_bias=False, router_jitter_noise=0.0, router_dtype="float32", router_ignore_padding_tokens=False,
      relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
      layer_norm_epsilon=1e-6, initializer_factor=1.0, dense_act_fn="relu", feed_forward_proj="relu",
      is_encoder_decoder=True, tie_word_embeddings=True, use_cache=True, pad_token_id=0, eos_token_id=1,
      decoder_start_token_id=0, add_router_probs=False)


def _load_weights(model: SwitchTransformer, folder: str) -> None:
  """Overwrites the model's weights (routers, dense weights, every expert) with a converted checkpoint's."""
  from swapmoe_jax import checkpoint as ckpt
  from swapmoe_jax.serving import loader

  meta = ckpt.read_metadata(folder)
  store = loader.HostExpertStore.from_numpy(ckpt.restore_all_experts(meta), meta.expert_norms, jnp.float32)
  graphdef, params, slots = loader.build_model(meta.config, ckpt.restore_dense(meta), store)
  src = nnx.merge(graphdef, params, slots)
  nnx.update(model, nnx.state(src, nnx.Any(nnx.Param, ExpertSlots)))


def init_model(cfg: SwitchConfig, s: Settings) -> SwitchTransformer:
  """Every expert resident, masked routing (= plain top-1), routers re-drawn small."""
  model = SwitchTransformer(cfg, rngs=nnx.Rngs(s.seed))
  key = jax.random.key(s.seed + 7)
  for _, moe in nnx.iter_graph(model):
    if isinstance(moe, VirtualExpertMoE):
      key, sub = jax.random.split(key)
      moe.router_w[...] = s.router_init_std * jax.random.normal(sub, moe.router_w.shape, jnp.float32)
  return model


def _pad(rows: list[list[int]], length: int) -> np.ndarray:
  out = np.zeros((len(rows), length), np.int32)  # pad id 0
  for r, ids in enumerate(rows):
    ids = ids[:length - 1] + [1]  # EOS last, as the HF tokenizer adds it
    out[r, :len(ids)] = ids
  return out


def batch_arrays(spiece_file: str, examples, s: Settings) -> dict[str, np.ndarray]:
  """Token arrays of examples: input ids/mask [N, S], decoder inputs, labels and label mask [N, T].

  Tokenized with sentencepiece directly (fast, batched); a test checks it equals the HF tokenizer."""
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor(model_file=spiece_file)
  ids = _pad(sp.encode([e.prompt for e in examples]), s.src_len)
  labels = _pad(sp.encode([e.answer for e in examples]), s.tgt_len)
  dec_in = np.concatenate([np.zeros_like(labels[:, :1]), labels[:, :-1]], axis=1)
  return dict(ids=ids, mask=ids != 0, dec_in=dec_in, labels=labels, label_mask=(labels != 0).astype(np.float32))


_CHUNK = 50_000


def _pool_chunk(args):
  spiece, s, k = args
  n = min(_CHUNK, s.pool_size - k * _CHUNK)
  return batch_arrays(spiece, tasks.training_examples(n, random.Random(s.seed * 1_000_003 + k)), s)


def training_pool(spiece: str, s: Settings) -> dict[str, np.ndarray]:
  """`s.pool_size` training examples as token arrays, generated in seeded chunks of 50,000 (in
  parallel processes when there are several chunks; the result does not depend on the process count)."""
  chunks = [(spiece, s, k) for k in range(-(-s.pool_size // _CHUNK))]
  if len(chunks) == 1:
    parts = [_pool_chunk(chunks[0])]
  else:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(min(len(chunks), os.cpu_count() or 1)) as workers:
      parts = workers.map(_pool_chunk, chunks)
  return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def loss_fn(model: SwitchTransformer, batch: dict, aux_coef: float):
  """Mean token cross-entropy + aux_coef * Switch load-balancing loss (mean over MoE layers)."""

  def forward(model, batch):
    enc_h, _ = model.encode(batch["ids"], batch["mask"])
    return model.decode_full(batch["dec_in"], enc_h, batch["mask"])[0]

  # Every module method's output is captured (unused ones are dead code under jit); the MoE layers'
  # `route` outputs, (routing, router probabilities), feed the load-balancing loss.
  logits, outputs = nnx.capture(forward, nnx.Intermediate, method_outputs=nnx.Intermediate)(model, batch)
  routes = [v.get_value() for path, v in nnx.to_flat_state(outputs) if path[-1] == "route"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
  w = batch["label_mask"]
  ce = jnp.sum(ce * w) / jnp.sum(w)
  correct = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * w) / jnp.sum(w)
  aux = []
  for ((routing, probs),) in routes:
    e = probs.shape[-1]
    frac = jnp.mean(jax.nn.one_hot(routing.wanted, e), axis=(0, 1))
    aux.append(e * jnp.sum(frac * jnp.mean(probs, axis=(0, 1))))
  aux = jnp.mean(jnp.stack(aux))
  return ce + aux_coef * aux, (ce, aux, correct)


def make_optimizer(model, s: Settings):
  schedule = optax.warmup_cosine_decay_schedule(0.0, s.peak_lr, s.warmup_steps, max(s.steps, s.warmup_steps + 1),
                                                s.peak_lr * 0.01)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=s.weight_decay))
  return nnx.Optimizer(model, tx, wrt=nnx.Any(nnx.Param, ExpertSlots))


@functools.partial(jax.jit, static_argnums=(0, 3), donate_argnums=1)
def train_step(graphdef, state, batch, aux_coef):
  """One AdamW step on (model, optimizer) given as a split state (donated). Returns (state, metrics)."""
  model, optimizer = nnx.merge(graphdef, state)
  (loss, (ce, aux, acc)), grads = nnx.value_and_grad(loss_fn, has_aux=True, argnums=nnx.DiffState(
      0, nnx.Any(nnx.Param, ExpertSlots)))(model, batch, aux_coef)
  optimizer.update(model, grads)
  return nnx.state((model, optimizer)), (loss, ce, aux, acc)


@functools.partial(jax.jit, static_argnums=(0, 3))
def eval_step(graphdef, state, batch, aux_coef):
  model, _ = nnx.merge(graphdef, state)
  return loss_fn(model, batch, aux_coef)[1]


# --- export ----------------------------------------------------------------------------------------
def checkpoint_trees(cfg: SwitchConfig, model: SwitchTransformer) -> tuple[dict, dict]:
  """The trained weights in the checkpoint layout: (dense tree, {(stack, block): {"wi", "wo"}})."""
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, ExpertSlots)))
  np_ = lambda x: np.asarray(jax.device_get(x), np.float32)  # noqa: E731
  dense = {"shared": np_(pure["shared"])}
  experts = {}
  for stack in ("encoder", "decoder"):
    src = pure[stack]
    blocks = {}
    for i, blk in src["blocks"].items():
      b = {"attn_norm": np_(blk["attn_norm"]["weight"]), "ffn_norm": np_(blk["ffn_norm"]["weight"]),
           "attn": {k: np_(v).T for k, v in blk["attn"].items()}}  # [out, in] -> the checkpoint's [in, out]
      if "cross" in blk:
        b["cross_norm"] = np_(blk["cross_norm"]["weight"])
        b["cross"] = {k: np_(v).T for k, v in blk["cross"].items()}
      if "moe" in blk:
        b["router"] = {"w": np_(blk["moe"]["router_w"])}
        # Slots are [out, in] (torch Linear's orientation); the checkpoint keeps [in, out].
        experts[(stack, int(i))] = {k: np.swapaxes(np_(blk["moe"][k]), 1, 2) for k in ("wi", "wo")}
      else:
        b["mlp"] = {k: np_(v).T for k, v in blk["mlp"].items()}
      blocks[str(i)] = b
    dense[stack] = {"rel_bias": np_(src["rel_bias"]), "final_norm": np_(src["final_norm"]["weight"]),
                    "blocks": blocks}
  return dense, experts


def export_hf(folder: str, cfg: SwitchConfig, config_json: dict, model: SwitchTransformer) -> None:
  """Writes a Hugging Face folder: config.json + model.safetensors (float32)."""
  from safetensors.numpy import save_file

  from checkpoints_conv.export import hf_state_dict

  dense, experts = checkpoint_trees(cfg, model)
  save_file(hf_state_dict(cfg, dense, experts), os.path.join(folder, "model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config_json, f, indent=2)


# --- evaluation --------------------------------------------------------------------------------------
def answers(folder: str, examples, *, batch_size: int = 64, max_new_tokens: int = 24, **load_kw) -> list[str]:
  """Greedy answers of a converted checkpoint to examples, through `swapmoe_jax.load`."""
  from swapmoe_jax.serving.loader import load

  model = load(folder, max_batch_size=batch_size, max_source_len=64, max_new_tokens=max_new_tokens, **load_kw)
  tok = model.tokenizer
  texts = []
  for k in range(0, len(examples), batch_size):
    chunk = examples[k:k + batch_size]
    prompts = [e.prompt for e in chunk] + [chunk[0].prompt] * (batch_size - len(chunk))  # one shape
    enc = tok(prompts, padding="max_length", max_length=64, return_tensors="np")
    out = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens)
    texts += [t.strip() for t in tok.batch_decode(out[:len(chunk)], skip_special_tokens=True)]
  return texts


def exact_match(folder: str, examples, **kw) -> float:
  """Greedy exact match of a converted checkpoint on examples (see `answers`)."""
  return sum(t == e.answer for t, e in zip(answers(folder, examples, **kw), examples)) / max(1, len(examples))


# --- main ----------------------------------------------------------------------------------------------
def train(out: str, s: Settings, progress: bool = True, keep_hf: str | None = None,
          tokenizer_dir: str | None = None) -> dict:
  """Trains, exports, converts into `out` (must not exist) and evaluates. Returns the training record."""
  from checkpoints_conv import convert

  out = os.path.abspath(out)
  if os.path.lexists(out):
    raise FileExistsError(f"{out} exists; pick another --out or remove it")
  t_start = time.time()
  hf_dir = tempfile.mkdtemp(prefix="swapmoe-train-hf-")
  try:
    if s.init_from and not tokenizer_dir:
      from swapmoe_jax import checkpoint as ckpt
      tokenizer_dir = ckpt.read_metadata(s.init_from).tokenizer_dir
    if tokenizer_dir:  # a tokenizer built earlier by `build_tokenizer` with the same settings
      for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), hf_dir)
      import transformers
      tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    else:
      tok = build_tokenizer(hf_dir, s)
    config_json = hf_config(s, len(tok))
    cfg = SwitchConfig.from_hf_dict(config_json)
    model = init_model(dataclasses.replace(cfg, expert_capacity=s.train_capacity), s)
    if s.init_from:
      _load_weights(model, s.init_from)
    graphdef, state = nnx.split((model, make_optimizer(model, s)))
    spiece = os.path.join(hf_dir, "spiece.model")
    pool = training_pool(spiece, s)
    rng = np.random.default_rng(s.seed)
    heldout = batch_arrays(spiece, tasks.make_examples(256, seed=s.seed + 2), s)
    history = []
    t_loop = time.time()
    steps_run = 0
    bar = None
    if progress:
      from tqdm.auto import tqdm
      bar = tqdm(total=s.steps, desc="training", unit="step", file=sys.stderr)
    for step in range(1, s.steps + 1):
      idx = rng.integers(0, s.pool_size, s.batch_size)
      state, (loss, ce, aux, acc) = train_step(graphdef, state, {k: v[idx] for k, v in pool.items()},
                                               s.aux_loss_coef)
      steps_run = step
      if bar is not None:
        bar.update(1)
      out_of_time = s.max_seconds > 0 and time.time() - t_loop > s.max_seconds
      if step % 500 == 0 or step == s.steps or out_of_time:
        hce, _, hacc = eval_step(graphdef, state, heldout, s.aux_loss_coef)
        row = dict(step=step, loss=float(loss), ce=float(ce), aux=float(aux), token_acc=float(acc),
                   heldout_ce=float(hce), heldout_token_acc=float(hacc))
        history.append(row)
        if bar is not None:
          bar.set_postfix(ce=f"{row['ce']:.3f}", heldout_acc=f"{row['heldout_token_acc']:.4f}")
        else:
          print(json.dumps(row), file=sys.stderr, flush=True)
      if out_of_time:
        break
    if bar is not None:
      bar.close()
    train_s = time.time() - t_start
    model, _ = nnx.merge(graphdef, state)
    export_hf(hf_dir, cfg, config_json, model)
    if keep_hf:
      shutil.copytree(hf_dir, keep_hf)
    convert(hf_dir, out, dtype=s.save_dtype, progress=progress)
  finally:
    shutil.rmtree(hf_dir, ignore_errors=True)
  em = {}
  examples = tasks.make_examples(s.eval_examples, seed=s.seed + 3)
  for fam in tasks.FAMILIES:
    em[fam] = exact_match(out, [e for e in examples if e.family == fam])
  hand = tasks.hand_typed_examples()
  got = answers(out, hand)
  wrong = {e.prompt: t for e, t in zip(hand, got) if t != e.answer}
  base = None
  if s.init_from and os.path.exists(os.path.join(s.init_from, "TRAINING.json")):
    with open(os.path.join(s.init_from, "TRAINING.json")) as f:
      base = json.load(f)
  record = dict(settings=dataclasses.asdict(s), base_model_training=base, steps_run=steps_run, tokenizer_pieces_kept=len(tok),
                train_seconds=round(train_s, 1),
                device=str(jax.devices()[0].device_kind), jax=jax.__version__, history=history,
                heldout_exact_match=dict(overall=float(np.mean(list(em.values()))), per_family=em),
                hand_typed_exact_match=dict(overall=1 - len(wrong) / len(hand), prompts=len(hand), wrong=wrong))
  with open(os.path.join(out, "TRAINING.json"), "w") as f:
    json.dump(record, f, indent=2)
  return record


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m swapmoe_jax.train", description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="output folder of the converted checkpoint (must not exist)")
  p.add_argument("--tiny", action="store_true", help="a tiny model and few steps (a smoke test)")
  p.add_argument("--keep-hf", help="also keep the Hugging Face export in this folder")
  p.add_argument("--tokenizer", help="reuse a tokenizer folder built with the same settings (skips training it)")
  p.add_argument("--build-tokenizer-only", action="store_true", help="write the tokenizer into --out and stop")
  for f in dataclasses.fields(Settings):
    p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
  a = p.parse_args(argv)
  base = dict(TINY) if a.tiny else {}
  base.update({f.name: getattr(a, f.name) for f in dataclasses.fields(Settings) if getattr(a, f.name) is not None})
  if a.build_tokenizer_only:
    os.makedirs(a.out, exist_ok=True)
    print(len(build_tokenizer(a.out, Settings(**base))), "pieces in", a.out)
    return 0
  try:
    record = train(a.out, Settings(**base), progress=sys.stderr.isatty(), keep_hf=a.keep_hf,
                   tokenizer_dir=a.tokenizer)
  except FileExistsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  em = record["heldout_exact_match"]
  print(json.dumps(dict(out=os.path.abspath(a.out), train_seconds=record["train_seconds"], **em,
                        hand_typed=record["hand_typed_exact_match"])))
  return 0


if __name__ == "__main__":
  sys.exit(main())
