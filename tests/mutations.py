"""Mutation check: break what a test names, on purpose, and watch that test fail.

Each :class:`Mutation` replaces one exact snippet of the library (it must occur exactly once) in a
scratch copy of the working tree, then runs the tests that claim to guard that behaviour there. A
mutation is *caught* when pytest reports failed tests (exit status 1); an import or collection
error (status 2-4) does not count, since it shows nothing about the test's assertions.

    .venv/bin/python -m tests.mutations            # every mutation (about 25-40 minutes on 2 cores)
    .venv/bin/python -m tests.mutations --list     # the table: mutation, file, the tests that catch it
    .venv/bin/python -m tests.mutations --only ledger-lock-noop dp-sgd-without-noise

The scratch copy holds the tracked and untracked (not ignored) files; ``PYTHONPATH`` points at it, so
the simulations the tests start in subprocesses and Ray workers import the mutated code too.
``tests/test_mutations.py`` checks in the suite that every snippet still occurs exactly once, so the
list cannot silently go stale as the code moves.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, or "-k" expressions after a file
    what: str
    also: tuple[tuple[str, str, str], ...] = ()  # further (path, old, new) edits made with the first

    def edits(self) -> tuple[tuple[str, str, str], ...]:
        return ((self.path, self.old, self.new), *self.also)


MUTATIONS: tuple[Mutation, ...] = (
    Mutation("ledger-lock-noop", "clients/state.py",
             "            fcntl.flock(f, fcntl.LOCK_EX)\n", "            pass  # mutated: no lock\n",
             ("tests/test_operations.py",), "DeviceState.locked() takes no lock"),
    Mutation("server-validation-skipped", "server/rounds.py",
             "    expected = {k: v for k, v in reference.items() if v.is_floating_point()}\n    names = ",
             "    return {k: torch.from_numpy(arrays[k].numpy().copy()) for k in arrays.keys()}\n"
             "    expected = {k: v for k, v in reference.items() if v.is_floating_point()}\n    names = ",
             ("tests/test_attacks.py", "-k", "malicious or absurd"), "the server accepts any update unchecked"),
    Mutation("secagg-plain-update", "fl/privacy/masks.py",
             "    words = np.frombuffer(stream, dtype=\"<u8\") % np.uint64(num_range - 1)\n",
             "    words = 0 * (np.frombuffer(stream, dtype=\"<u8\") % np.uint64(num_range - 1))\n",
             ("tests/test_secure_round.py", "-k", "never_receives"),
             "SecAgg+ masks are all zero: the server holds each device's quantised update in clear"),
    Mutation("resume-loses-the-secret", "server/checkpoint.py",
             "    return Secret.load_or_create(private_path(out_dir) / SECRET)\n",
             "    (private_path(out_dir) / SECRET).unlink(missing_ok=True)\n"
             "    return Secret.load_or_create(private_path(out_dir) / SECRET)\n",
             ("tests/test_device_policy.py", "-k", "persisted_secret"),
             "a resumed run draws a fresh server secret instead of the persisted one"),
    Mutation("dp-sgd-without-noise", "fl/privacy/sample.py",
             "            p.grad = (p.summed_grad + noise).view_as(p)\n",
             "            p.grad = (p.summed_grad + 0 * noise).view_as(p)\n",
             ("tests/test_privacy_sample.py", "tests/test_attacks.py", "-k", "dp_sgd or noise"),
             "a device's DP-SGD step adds no noise"),
    Mutation("dp-fedsgd-without-central-noise", "fl/privacy/sample.py",
             "            total = {k: v + noise[k] for k, v in total.items()}\n",
             "            total = {k: v + 0 * noise[k] for k, v in total.items()}\n",
             ("tests/test_fedsgd.py",), "the server adds no DP-FedSGD noise to the round's total"),
    Mutation("sample-accountant-drops-a-round", "fl/privacy/sample.py",
             "            steps[(z, q)] = steps.get((z, q), 0) + n\n",
             "            steps[(z, q)] = max(steps.get((z, q), 0), n)\n",
             ("tests/test_accounting.py", "tests/test_privacy_sample.py"),
             "composing equal sample-level rounds keeps one round's steps"),
    Mutation("user-accountant-drops-a-round", "fl/privacy/accounting.py",
             "        z = sum(s.rounds / s.noise_multiplier**2 for s in specs) ** -0.5\n",
             "        z = sum(s.rounds / s.noise_multiplier**2 for s in specs[1:]) ** -0.5\n",
             ("tests/test_accounting.py",), "composing user-level rounds forgets the first run's rounds"),
    Mutation("membership-attack-sign", "fl/audit/membership.py",
             "    members = [-x for x in member_losses]\n", "    members = [x for x in member_losses]\n",
             ("tests/test_membership.py",), "the loss attack scores members by +loss, non-members by -loss"),
    Mutation("canary-rank-reversed", "fl/audit/canaries.py",
             "    rank = 1 + sum(1 for x in reference_losses if x < canary_loss)\n",
             "    rank = 1 + sum(1 for x in reference_losses if x > canary_loss)\n",
             ("tests/test_canaries.py",), "a canary is ranked by the references above it"),
    Mutation("guard-lets-anything-out", "clients/guard.py",
             "    extra = set(content_keys) - {P.ARRAYS, P.METRICS}\n",
             "    return  # mutated: the outbound guard checks nothing\n"
             "    extra = set(content_keys) - {P.ARRAYS, P.METRICS}\n",
             ("tests/test_simulation.py", "-k", "send_only"),
             "the outbound guard lets any key through, and each training reply carries one more metric; "
             "the server's inbound inventory, not the device's log, must show it",
             also=(("clients/client_app.py", "    arrays, record = ArrayRecord(update), MetricRecord(metrics)\n",
                    "    arrays, record = ArrayRecord(update), MetricRecord({**metrics, \"loss-per-utterance\": 1.0})\n"),)),
)


def scratch_copy(dest: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the working tree, copied to ``dest``."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def apply(mutation: Mutation, tree: Path) -> None:
    """Replace each of the mutation's snippets in ``tree`` (a ValueError unless each occurs exactly once)."""
    for name, old, new in mutation.edits():
        path = tree / name
        text = path.read_text(encoding="utf-8")
        if text.count(old) != 1:
            raise ValueError(f"{mutation.name}: a snippet occurs {text.count(old)} times in {name}")
        path.write_text(text.replace(old, new), encoding="utf-8")


def run(mutation: Mutation, timeout: float) -> tuple[str, float, str]:
    """(verdict, seconds, pytest's last lines) of the mutation's tests on a mutated scratch copy."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as tmp:
        tree = Path(tmp)
        scratch_copy(tree)
        apply(mutation, tree)
        env = dict(os.environ, PYTHONPATH=str(tree), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
        start = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                   *mutation.tests], cwd=tree, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.monotonic() - start, ""
        tail = "\n".join(proc.stdout.strip().splitlines()[-3:])
        verdict = {0: "SURVIVED", 1: "caught"}.get(proc.returncode, f"error (pytest status {proc.returncode})")
        return verdict, time.monotonic() - start, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run just these mutations")
    parser.add_argument("--list", action="store_true", help="print the mutation table and exit")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per mutation")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations {sorted(unknown)}; --list shows them")
    if args.list:
        for m in chosen:
            print(f"{m.name:34s} {m.path:26s} {' '.join(m.tests)}\n{'':34s} {m.what}")
        return 0
    survived = 0
    for m in chosen:
        verdict, seconds, tail = run(m, args.timeout)
        survived += verdict != "caught"
        print(f"{m.name:34s} {verdict:10s} {seconds:6.0f} s  {' '.join(m.tests)}", flush=True)
        if verdict != "caught":
            print("    " + tail.replace("\n", "\n    "), flush=True)
    print(f"{len(chosen) - survived} of {len(chosen)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
