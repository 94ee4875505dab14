"""What a run publishes (results.jsonl, progress.json, summary.json, experimenter_view.json) and what
it keeps in its private folder: published outputs carry only values an epsilon covers or public config."""

import json
import logging

import pytest

from server.results import (DEVICE_REPORTED, PRIVATE_FIELDS, PUBLISHED_UNDER_PRIVACY, REALISED, ResultsWriter,
                            RoundRow, read_experimenter_view, read_private_rounds, read_results, split_row,
                            write_experimenter_view)
from server.server_app import PROGRESS_UNDER_PRIVACY, WAITING, progress_fields


def _row(r: int = 2, **over) -> RoundRow:
    fields = dict(round=r, wer=0.4, cer=0.2, loss=1.5, device_wer=None, device_cer=None, train_loss=None, clients=3,
                  declined=1, failures=2, rejected=1, epsilon_sample=1.25, epsilon_user=None, epsilon_user_server=None,
                  delta=1e-5, delta_user=None, extrapolated=False, randomness="secret", seconds=12.5, raw_wer=0.5,
                  loops_cut=0)
    return RoundRow(**(fields | over))


def test_under_privacy_a_published_row_holds_exactly_the_allow_list():
    published, private = split_row(_row(device_wer=0.3, train_loss=0.9), private=True, expected_cohort=6)
    assert set(published) == PUBLISHED_UNDER_PRIVACY
    assert not set(published) & (set(REALISED) | set(DEVICE_REPORTED))
    assert published["expected_cohort"] == 6 and published["epsilon_sample"] == 1.25
    assert private == {"round": 2, "clients": 3, "declined": 1, "failures": 2, "rejected": 1, "seconds": 12.5}
    assert split_row(_row(0), True, 6)[0]["expected_cohort"] == 0  # the seed's row: nobody was asked


def test_without_privacy_a_row_keeps_everything():
    published, private = split_row(_row(device_wer=0.3, train_loss=0.9), private=False, expected_cohort=6)
    assert {"clients", "declined", "failures", "rejected", "seconds", "device_wer", "train_loss"} <= set(published)
    assert published["clients"] == 3 and published["expected_cohort"] == 6 and set(private) == set(PRIVATE_FIELDS)


def test_the_writer_splits_rows_into_the_published_file_and_the_owner_only_one(tmp_path):
    private_dir = tmp_path / "private"
    private_dir.mkdir(mode=0o700)
    writer = ResultsWriter(tmp_path, private=True, expected_cohort=4, private_dir=private_dir)
    writer.append(_row(0, clients=0, declined=0, failures=0, rejected=0))
    writer.append(_row(1, seconds=float("nan")))
    assert [set(r) for r in read_results(tmp_path)] == [PUBLISHED_UNDER_PRIVACY] * 2
    realised = read_private_rounds(tmp_path)
    assert [r["clients"] for r in realised] == [0, 3] and realised[1]["seconds"] is None
    assert (private_dir / "rounds-private.jsonl").stat().st_mode & 0o777 == 0o600
    assert "clients" not in (tmp_path / "results.jsonl").read_text()
    writer.restore([_row(0)])  # a resume rewrites both files from the committed rows
    assert len(read_results(tmp_path)) == len(read_private_rounds(tmp_path)) == 1
    assert writer.rows == [_row(0)]  # the server keeps the whole row (its private state commits it)


def test_an_unreadable_private_folder_reads_as_nothing(tmp_path):
    assert read_private_rounds(tmp_path) == []


def test_progress_under_privacy_says_the_expected_cohort_and_no_count_or_time():
    live = dict(phase="round done", round=2, rounds=5, connected=7, expected_cohort=4, cohort=5, replies=4,
                failures=1, rejected=0)
    assert progress_fields(True, **live) == {"phase": "round done", "round": 2, "rounds": 5, "expected_cohort": 4}
    assert set(progress_fields(True, **live)) <= PROGRESS_UNDER_PRIVACY
    assert progress_fields(True, phase=WAITING, connected=3, wanted=4) == {"phase": WAITING, "connected": 3,
                                                                           "wanted": 4}
    everything = progress_fields(False, **live)
    assert everything["cohort"] == 5 and everything["failures"] == 1 and "time" in everything


def test_the_experimenter_view_is_labelled_and_the_collector_reads_it(tmp_path):
    from experiments.collect import row_from_run

    run = tmp_path / "run"
    run.mkdir()
    scores = {"wer": 0.5, "cer": 0.3}
    (run / "summary.json").write_text(json.dumps({
        "config": {"name": "x", "privacy": {"sample": {}}}, "seed_model": scores, "final": scores, "rounds": 2,
        "privacy": {"sample": {"epsilon": 2.0, "delta": 1e-5, "noise_multiplier": 1.0}, "user": None}}))
    write_experimenter_view(run, {"simulation_eval": {"final": {"device_wer": 0.25, "device_cer": 0.1}}})
    assert read_experimenter_view(run)["label"] == "experimenter view, not covered by DP"
    row = row_from_run(run, tmp_path)
    assert row.device_wer == 0.25 and row.device_cer == 0.1
    assert row.seconds is None  # a private run publishes no wall time, and the collector reads no private file


def test_the_server_logs_an_error_reply_by_its_code_only(caplog, task_identity):
    """A Flower error reason (free text, e.g. a ClientApp that failed outside the guard) is never logged."""
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, Error

    from fl import protocol as P
    from server.rounds import exchange

    secret = "/home/alice/rec/clip7.wav: 'call my mother'"

    class Grid:
        def send_and_receive(self, messages, timeout=None):
            return [SimpleNamespace(has_error=lambda: True, error=Error(code=2, reason=secret),
                                    metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id)) for m in messages]

    with caplog.at_level(logging.WARNING, logger="server.rounds"):
        replies = exchange(Grid(), [5], "train", ArrayRecord(), 1, 1.0, {})
    assert replies.failed == [5]
    assert "error 2 (Flower error code 2)" in caplog.text and "alice" not in caplog.text
    assert "mother" not in caplog.text
    assert P.error_text(P.ERROR_TRAINING) == "training failed on the device"


@pytest.mark.parametrize("name", ["seconds", "clients", "failures", "declined", "rejected"])
def test_no_realised_figure_is_in_the_allow_list(name):
    assert name not in PUBLISHED_UNDER_PRIVACY and name not in PROGRESS_UNDER_PRIVACY


# --- the server's own outputs, in process (no simulation: a grid whose devices are functions) -----

class _Grid:
    def __init__(self, handlers):
        self.handlers = handlers

    def get_node_ids(self):
        return sorted(self.handlers)

    def send_and_receive(self, messages, timeout=None):
        return [r for r in (self.handlers[m.metadata.dst_node_id](m) for m in messages) if r is not None]


def _device(bad: bool = False, silent: bool = False):
    import torch
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    from fl import protocol as P

    def handle(msg):
        if msg.metadata.message_type == MessageType.QUERY:
            return Message(RecordDict({P.METRICS: MetricRecord({P.DEVICE_KEY: msg.metadata.dst_node_id})}),
                           reply_to=msg)
        if silent:
            return None
        config = dict(msg.content[P.CONFIG])
        g = torch.Generator().manual_seed(msg.metadata.dst_node_id)
        arrays = {k: Array((torch.randn(v.shape, generator=g) * 1e-4).numpy())
                  for k, v in msg.content[P.ARRAYS].to_torch_state_dict().items() if v.is_floating_point()}
        echo = {k: v for k, v in config.items() if k.startswith(("sample-", "user-"))}
        if bad:
            echo["sample-z"] = 0.0  # a wrong echo: rejected
        return Message(RecordDict({P.ARRAYS: ArrayRecord(arrays), P.METRICS: MetricRecord(echo)}), reply_to=msg)

    return handle



@pytest.mark.parametrize("private", [True, False], ids=["sample", "none"])
def test_the_server_publishes_the_allow_list_under_privacy_and_keeps_the_counts_private(tmp_path, task_identity,
                                                                                        private):
    import torch

    from fl.config import SamplePrivacyConfig, TrainConfig
    from fl.data.text import CharTokenizer
    from fl.model.conformer import ConformerCTC
    from server.server_app import ServerSettings, run_server
    from tests.conftest import TINY, fake_examples

    torch.manual_seed(0)
    torch.save({"state_dict": ConformerCTC(TINY, CharTokenizer().vocab_size).state_dict()}, tmp_path / "seed.pt")
    torch.save(fake_examples(4), tmp_path / "eval.pt")
    handlers = {1: _device(), 2: _device(), 3: _device(bad=True), 4: _device(silent=True)}
    sample = SamplePrivacyConfig(noise_multiplier=1.0) if private else None
    s = ServerSettings(out_dir=str(tmp_path / "run"), rounds=2, clients_per_round=4, round_timeout=5.0, seed=0,
                       model=TINY, train=TrainConfig(local_steps=2, lr=1e-3), initial_weights=str(tmp_path / "seed.pt"),
                       eval_examples=str(tmp_path / "eval.pt"), config={}, sampling="fixed", sample=sample)
    if not private:  # without privacy the devices send example counts (FedAvg weights)
        handlers = {n: (lambda h: lambda m: _with_count(h(m)))(h) for n, h in handlers.items()}
    run_server(_Grid(handlers), s)
    run = tmp_path / "run"
    rows, realised = read_results(run), read_private_rounds(run)
    assert [r["round"] for r in rows] == [r["round"] for r in realised] == [0, 1, 2]
    assert [(r["clients"], r["rejected"], r["failures"]) for r in realised[1:]] == [(2, 1, 1)] * 2
    summary = json.loads((run / "summary.json").read_text())
    progress = json.loads((run / "progress.json").read_text())
    if private:
        assert all(set(r) == PUBLISHED_UNDER_PRIVACY for r in rows)
        assert [r["expected_cohort"] for r in rows] == [0, 4, 4]
        assert "seconds" not in summary and "devices_charged" not in summary["privacy"]["sample"]
        assert set(progress) <= PROGRESS_UNDER_PRIVACY
    else:
        assert [(r["clients"], r["rejected"], r["failures"]) for r in rows[1:]] == [(2, 1, 1)] * 2
        assert "seconds" in summary and "time" in progress
    totals = json.loads((run / "private" / "summary-private.json").read_text())
    assert totals["devices_charged"] == 4 and totals["seconds"] > 0


def _with_count(reply):
    from fl import protocol as P

    if reply is not None and P.METRICS in reply.content and P.DEVICE_KEY not in reply.content[P.METRICS]:
        metrics = reply.content[P.METRICS]
        if "sample-z" in metrics:  # the "bad" device: without privacy a wrong count is its fault instead
            del metrics["sample-z"]
            metrics[P.NUM_EXAMPLES] = 0
        else:
            metrics[P.NUM_EXAMPLES] = 10
    return reply


def _doc_row(first_cell: str) -> list[str]:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "privacy.md").read_text()
    line = next(x for x in doc.splitlines() if x.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _names(cell: str) -> set[str]:
    import re

    return set(re.findall(r"`([a-z_]+)`", cell))


def test_docs_privacy_lists_exactly_what_each_output_holds():
    from fl import protocol as P

    assert _names(_doc_row("`results.jsonl`")[2]) == PUBLISHED_UNDER_PRIVACY
    assert _names(_doc_row("`results.jsonl`")[3]) == set(REALISED) | set(DEVICE_REPORTED)
    assert _names(_doc_row("`progress.json`")[2]) == PROGRESS_UNDER_PRIVACY | {"connected"}
    private = _doc_row("`private/` (0700, files 0600)")[2]
    assert set(PRIVATE_FIELDS) <= _names(private.split("rounds-private.jsonl")[1].split(";")[0])
    for code, text in P.DEVICE_ERRORS.items():
        cells = _doc_row(str(code))
        assert cells[1].startswith(text.split(" (")[0])


def test_the_launchers_live_view_reads_public_progress_and_its_own_private_counts(tmp_path):
    from rich.console import Console

    from experiments.launch import _view

    private_dir = tmp_path / "private"
    private_dir.mkdir(mode=0o700)
    writer = ResultsWriter(tmp_path, private=True, expected_cohort=4, private_dir=private_dir)
    writer.append(_row(0))
    writer.append(_row(1))
    (tmp_path / "progress.json").write_text(json.dumps(progress_fields(
        True, phase="round done", round=1, rounds=3, connected=9, expected_cohort=4, cohort=5, replies=4,
        failures=1, rejected=1)))
    console = Console(record=True, width=200)
    console.print(_view(tmp_path, 3, "run-1"))
    text = console.export_text()
    assert "4 devices expected" in text and "private: 3 updates, 1 declined, 2 failed, 1 rejected" in text
