"""Rebuilds the tiny test tokenizer in this folder (run once; the outputs are committed).

  /work/venv/bin/python tests/data/tokenizer/build_tokenizer.py

A sentencepiece unigram model with T5's special ids (pad 0, eos 1, unk 2, no bos) and 96 pieces, so
that every id fits the tiny test model's vocabulary (`tests/hf_fixtures.tiny_config`, vocab 96).
No sentinel (`<extra_id_*>`) tokens: `extra_ids=0`.
"""

import io
import os
import shutil
import tempfile

import sentencepiece as spm
import transformers

VOCAB_SIZE = 96

_CORPUS = """\
Amanda: I baked cookies. Do you want some?
Jerry: Sure! What kind of cookies are they?
Amanda: Chocolate chip, my grandmother's recipe. I'll bring you some tomorrow.
Hannah: Hey, do you have Betty's number?
Larry: Sorry, I don't. Ask Brian, he called her last time we were at the park together.
Hannah: I'd rather text him. Thanks anyway!
Tom: The meeting is moved to Monday at ten in the morning.
Anna: Good, that gives us the weekend to finish the report and check the numbers.
The quick brown fox jumps over the lazy dog while the cat sleeps on the warm window sill.
A mixture of experts routes each token to one expert; only the routed expert runs for that token.
Switch Transformers replace every other feed forward layer with a sparse layer of many experts.
Memory on the accelerator is small, so only some experts stay resident and the others wait on the host.
Summaries should be short, clear and faithful to the dialogue they describe.
We went to the market, bought apples, bread, cheese and milk, and then walked home in the rain.
Please remember to water the plants, feed the dog and lock the door before you leave tonight.
"""


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  with tempfile.TemporaryDirectory() as tmp:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines() * 4),
        model_writer=model,
        model_type="unigram",
        vocab_size=VOCAB_SIZE,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        normalization_rule_name="identity",  # no charsmap: keeps the files a few KB
        num_threads=1,
        minloglevel=2,
    )
    spiece = os.path.join(tmp, "spiece.model")
    with open(spiece, "wb") as f:
      f.write(model.getvalue())
    tok = transformers.T5Tokenizer.from_pretrained(tmp, extra_ids=0)
    assert len(tok) == VOCAB_SIZE, len(tok)
    out = os.path.join(tmp, "out")
    tok.save_pretrained(out)
    shutil.copy(spiece, os.path.join(out, "spiece.model"))
    for name in sorted(os.listdir(out)):
      shutil.copy(os.path.join(out, name), os.path.join(here, name))
      print(name, os.path.getsize(os.path.join(here, name)))


if __name__ == "__main__":
  main()
