"""Compare fine-tuning recipes (which parameters train, learning rate, noise) for a recognizer, fast.

``python -m experiments.recipes NAME LR Z [--rounds R]``: a FedAvg loop in one process over the
library's own training code (``SampleLevel.train`` for DP-SGD when ``Z > 0``, ``plain_round``
otherwise) on the embedded corpus's private speakers: the first 4 speakers (sorted) are held out
(80 utterances scored), the other 8 are devices (30 utterances train, the rest their test split),
6 devices a round draw ``local_steps`` steps each. No Flower, no Ray: what it measures is the recipe,
not the system. It prints one JSON line. docs/architecture.md's recipe table came from it; the
selections are :data:`RECIPES`.

Measurement only: the secrets are fresh from the OS, so reruns differ like real runs do.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from fl.config import ModelConfig, TrainConfig
from fl.data.embedded import build_embedded_corpus
from fl.data.features import featurize
from fl.model import build_recognizer
from fl.model.whisper import DEFAULT_TRAINABLE
from fl.privacy.gaussian import model_delta
from fl.privacy.randomness import Secret
from fl.privacy.sample import SampleAccount, SampleLevel
from fl.train import evaluate, plain_round

RECIPES = {
    "final_ln": r"^model\.decoder\.layer_norm",
    "ln": r"^model\.decoder\.(layers\.\d+\..*layer_norm|layer_norm)",
    "bias_ln": DEFAULT_TRAINABLE,  # the preset
    "last_block": r"^model\.decoder\.(layers\.3\.|layer_norm)",
    "blocks": r"^model\.decoder\.layers\.",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", choices=sorted(RECIPES))
    parser.add_argument("lr", type=float)
    parser.add_argument("z", type=float, help="DP-SGD noise multiplier (0: no DP)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--devices-per-round", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--cache", default=".cache")
    parser.add_argument("--model-path", help="a Hugging Face Whisper folder (default: the pinned tiny.en)")
    parser.add_argument("--device", default="cpu",
                        help="where the model runs: cpu (default, as measured), auto, cuda, cuda:N")
    args = parser.parse_args()
    started = time.perf_counter()
    corpus = build_embedded_corpus(Path(args.cache) / "embedded", n_public=0, n_private=12, public_utterances=0,
                                   private_utterances=40, seed=0, shift=0.5)
    try:
        recognizer = build_recognizer(ModelConfig(kind="whisper", path=args.model_path), RECIPES[args.recipe],
                                      args.device)
    except ValueError as err:  # a device this machine lacks
        parser.error(str(err))
    examples = featurize(corpus.private, recognizer, Path(args.cache) / "features").examples
    speakers = sorted({e.speaker for e in examples})
    held_out = [e for e in examples if e.speaker in speakers[:4]][:80]
    devices = {s: [e for e in examples if e.speaker == s] for s in speakers[4:]}
    train = {s: v[:30] for s, v in devices.items()}
    tests = [e for v in devices.values() for e in v[30:]]
    module = recognizer.new_module()
    seed_eval = evaluate(recognizer, module, held_out)
    shared = recognizer.shared(module)
    level = SampleLevel(args.z or 1.0, 1.0, 0.25, args.local_steps)
    cohorts = random.Random(0)
    config = TrainConfig(local_steps=args.local_steps, batch_size=8, lr=args.lr)
    for r in range(args.rounds):
        deltas = []
        for s in cohorts.sample(sorted(train), args.devices_per_round):
            local = recognizer.module_from(shared)
            base = {k: v.clone() for k, v in recognizer.shared(local).items()}
            if args.z > 0:
                level.train(local, recognizer, train[s], config, SampleAccount(), Secret.generate(), 0)
            else:
                plain_round(local, recognizer, train[s], config, r)
            deltas.append(model_delta(recognizer.shared(local), base))
        shared = {k: shared[k] + sum(d[k] for d in deltas) / len(deltas) for k in shared}
    final = recognizer.module_from(shared)
    held, dev = evaluate(recognizer, final, held_out), evaluate(recognizer, final, tests)
    print(json.dumps({
        "recipe": args.recipe, "values": sum(v.numel() for v in shared.values()), "lr": args.lr, "z": args.z,
        "rounds": args.rounds, "epsilon": level.epsilon(args.rounds) if args.z > 0 else None,
        "seed_held_wer": seed_eval.wer, "held_wer": held.wer, "held_raw_wer": held.raw_wer,
        "loops_cut": held.loops_cut, "devices_test_wer": dev.wer, "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
