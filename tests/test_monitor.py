"""What a run reports (m2r/engine/monitor.py): console, metrics.jsonl and TensorBoard, across resumes."""
import json
import time
from types import SimpleNamespace

import pytest
import torch

from m2r.engine.monitor import Monitor, NullMonitor


def read_records(path):
    """metrics.jsonl's records without their wall-clock `time` (test_every_record_starts_with_its_step_and_the_time)."""
    return [{key: value for key, value in json.loads(line).items() if key != "time"}
            for line in path.read_text().splitlines()]


def test_other_ranks_null_monitor_takes_the_same_calls_as_rank_0s():
    import inspect

    public = [name for name in vars(NullMonitor) if not name.startswith("_")]
    assert public and all(inspect.signature(getattr(NullMonitor, name)) == inspect.signature(getattr(Monitor, name))
                          for name in public)


@pytest.mark.parametrize("tensorboard", [True, False])
def test_metrics_file_always_and_tensorboard_only_when_asked(tmp_path, tensorboard):
    monitor = Monitor(tmp_path, total_steps=2, start_step=0, world_size=1, progress_bar=False, tensorboard=tensorboard)
    monitor.log_train(1, {"loss": 0.5, "pixel_loss": 0.4, "balance_loss": 1.0, "lr": 1e-3}, log_step=False)
    monitor.log_val(1, {"psnr": 20.0, "ssim": 0.5})
    monitor.log_images(1, torch.zeros(3, 8, 8))
    monitor.log_data_stats(1, {"rain": 3, "haze": 1}, corrupt_samples=2)
    monitor.close()
    records = read_records(tmp_path / "metrics.jsonl")
    assert records[0]["loss"] == 0.5 and records[1]["val_psnr"] == 20.0
    assert records[2] == {"step": 1, "samples_by_type": {"rain": 3, "haze": 1}, "corrupt_samples": 2}
    assert (tmp_path / "tensorboard").is_dir() == tensorboard


def test_a_resumed_runs_metrics_file_reads_as_an_uninterrupted_runs(tmp_path):
    """Resumed at step 3: step 4, logged after the checkpoint, is logged again by the resumed run, and
    a line cut off by a crash goes; the running average continues from the steps kept."""
    kept = [{"step": 0, "val_psnr": 9.0}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
            {"step": 2, "val_psnr": 20.0}, {"step": 3, "loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept)
                                            + '{"step": 4, "loss": 9.0}\n{"step": 5, "lo')
    monitor = Monitor(tmp_path, total_steps=6, start_step=3, world_size=1, progress_bar=False, tensorboard=False)
    monitor.log_train(4, {"loss": 4.0, "pixel_loss": 4.0, "balance_loss": 0.0, "lr": 1e-3}, log_step=False)
    monitor.close()
    records = read_records(tmp_path / "metrics.jsonl")
    assert records == kept + [{"step": 4, "loss": 4.0, "pixel_loss": 4.0, "balance_loss": 0.0, "lr": 1e-3,
                               "loss_avg": 2.5}]


def test_tensorboard_forgets_the_steps_a_resumed_run_logs_again(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {"pixel_loss": 0.0, "balance_loss": 0.0, "lr": 1e-3, "img_per_s": 1.0, "data_wait_share": 0.0}
    for start_step, losses in [(0, {1: 1.0, 2: 2.0, 3: 3.0}), (2, {3: 30.0})]:   # resumed at step 2
        monitor = Monitor(tmp_path, total_steps=3, start_step=start_step, world_size=1, progress_bar=False)
        for step, loss in losses.items():
            monitor.log_train(step, dict(scalars, loss=loss), log_step=True)
        monitor.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_a_fresh_start_drops_what_a_run_killed_before_its_first_checkpoint_logged(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "val_psnr": 9.0}\n{"step": 1, "loss": 1.0}\n')
    Monitor(tmp_path, total_steps=6, start_step=0, world_size=1, progress_bar=False, tensorboard=False).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


class _Clock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_step_timer_counts_the_steps_since_the_last_report_but_not_the_work_left_out(monkeypatch):
    """img/s and the data-wait share cover the training steps since the last report only, reporting
    and agreeing included, validation and checkpoints (`exclude_since`) not."""
    from m2r.engine import monitor as monitor_module

    clock = _Clock()
    monkeypatch.setattr(monitor_module, "time", clock)
    timer = monitor_module.StepTimer()
    clock.now = 1.0
    timer.add_data_wait(0.25)
    timer.end_step(4)
    clock.now = 3.0
    timer.end_step(4)
    assert timer.take() == pytest.approx({"img_per_s": 8 / 3, "data_wait_share": 0.25 / 3})
    clock.now = 3.5    # the step's report and the stop agreement: step time
    started = clock.now
    clock.now = 13.5   # validation and a checkpoint
    timer.exclude_since(started)
    clock.now = 14.0
    timer.end_step(2)
    assert timer.take() == pytest.approx({"img_per_s": 2.0, "data_wait_share": 0.0})


def test_the_image_grid_shows_degraded_restored_clean_rows_with_the_restored_clamped():
    from m2r.engine.validate import image_grid

    lq, gt = torch.full((5, 3, 2, 4), 0.25), torch.full((5, 3, 2, 4), 0.75)
    restored = torch.tensor([-1.0, 2.0]).repeat_interleave(4).reshape(1, 1, 2, 4).expand(5, 3, 2, 4)
    grid = image_grid(lq, restored, gt, max_images=3)
    assert grid.shape == (3, 3 * 2, 3 * 4) and grid.dtype == torch.float32
    row = grid[:, :2]
    assert torch.equal(row[..., :4], lq[0]) and torch.equal(row[..., 8:], gt[0])
    assert torch.equal(row[:, 0, 4:8], torch.zeros(3, 4)) and torch.equal(row[:, 1, 4:8], torch.ones(3, 4))


SCALARS = {"pixel_loss": 0.0, "balance_loss": 0.0, "lr": 1e-3, "img_per_s": 8.0, "data_wait_share": 0.0}


def test_the_loss_average_runs_over_the_last_100_steps(tmp_path):
    monitor = Monitor(tmp_path, total_steps=150, start_step=0, world_size=1, progress_bar=False, tensorboard=False)
    for step in range(1, 151):
        monitor.log_train(step, dict(SCALARS, loss=float(step)), log_step=False)
    monitor.close()
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["loss_avg"] == pytest.approx(sum(range(51, 151)) / 100)


def test_tensorboard_gets_per_gpu_throughput_and_expert_loads_by_level_from_1(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = Monitor(tmp_path, total_steps=2, start_step=0, world_size=4, progress_bar=False)
    monitor.log_train(1, dict(SCALARS, loss=1.0), log_step=True)
    monitor.log_expert_load(1, [torch.tensor([0.25, 0.75]), torch.tensor([1.0, 0.0])])
    monitor.close()
    assert "8.0 img/s (2.0/GPU)" in capsys.readouterr().out
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/img_per_s_per_gpu")] == [2.0]
    assert [e.value for e in events.Scalars("moe/level1/expert1")] == [0.75]
    assert [e.value for e in events.Scalars("moe/level2/expert0")] == [1.0]


def test_each_level_reports_its_largest_expert_load_and_with_a_capacity_its_dropped_share(tmp_path, capsys):
    """One scalar per level each, readable where the per-expert tags are 144 curves (48 experts x 3 levels):
    TensorBoard and a metrics.jsonl record at the log step; the dropped shares join that step's console line."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = Monitor(tmp_path, total_steps=4, start_step=0, world_size=4, progress_bar=False)
    loads = [torch.tensor([0.25, 0.75]), torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])]
    monitor.log_expert_load(1, loads)     # no capacity: no dropped share anywhere
    monitor.log_train(1, dict(SCALARS, loss=1.0), log_step=True)
    monitor.log_expert_load(2, loads, dropped=torch.tensor([0.125, 0.0, 0.0004]))
    monitor.log_train(2, dict(SCALARS, loss=1.0), log_step=True)
    monitor.log_train(3, dict(SCALARS, loss=1.0), log_step=True)   # a line of its own: no stale shares
    monitor.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert "drop" not in lines[0] and "drop" not in lines[2]
    assert "| drop 12.5/0.0/0.04% |" in lines[1]
    records = read_records(tmp_path / "metrics.jsonl")
    moe = [record for record in records if "moe/level1/max_load" in record]
    assert moe[0] == {"step": 1, "moe/level1/max_load": 0.75, "moe/level2/max_load": 0.5, "moe/level3/max_load": 1.0}
    assert moe[1]["step"] == 2 and moe[1]["moe/level1/dropped"] == 0.125 and moe[1]["moe/level2/dropped"] == 0.0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("moe/level1/max_load")] == [(1, 0.75), (2, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("moe/level1/dropped")] == [(2, 0.125)]


def test_every_record_starts_with_its_step_and_the_time(tmp_path):
    """The wall clock (Unix seconds) of each record, for plots against time that show pauses and preemptions;
    the step stays first, where a resume reads it (`RECORD_STEP`)."""
    from m2r.engine.monitor import RECORD_STEP

    before = time.time()
    monitor = Monitor(tmp_path, total_steps=2, start_step=0, world_size=1, progress_bar=False, tensorboard=False)
    monitor.log_val(0, {"psnr": 20.0, "ssim": 0.5})
    monitor.log_expert_load(1, [torch.tensor([0.25, 0.75])])
    monitor.log_data_stats(1, {"rain": 3}, corrupt_samples=0)
    monitor.log_train(1, dict(SCALARS, loss=1.0), log_step=True)
    monitor.close()
    lines = (tmp_path / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    assert len(lines) == 4 and all(RECORD_STEP.match(line) for line in lines)
    records = [json.loads(line) for line in lines]
    assert all(list(record)[:2] == ["step", "time"] for record in records)
    assert all(round(before, 3) <= record["time"] <= round(time.time(), 3) for record in records)   # to the ms


def test_fp16_log_steps_report_the_loss_scale_and_the_steps_skipped_since_the_last_one(tmp_path, capsys):
    """metrics.jsonl and TensorBoard get both every log step; the console line names skipped steps only when
    there were some. Runs without them (bf16, fp32) log as before."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = Monitor(tmp_path, total_steps=3, start_step=0, world_size=1, progress_bar=False)
    monitor.log_train(1, dict(SCALARS, loss=1.0, loss_scale=32768.0, skipped_steps=2), log_step=True)
    monitor.log_train(2, dict(SCALARS, loss=1.0, loss_scale=32768.0, skipped_steps=0), log_step=True)
    monitor.log_train(3, dict(SCALARS, loss=1.0), log_step=True)
    monitor.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert "| skipped 2 (fp16 overflow, scale 32768) |" in lines[0]
    assert "skipped" not in lines[1] and "skipped" not in lines[2]
    records = read_records(tmp_path / "metrics.jsonl")
    assert [(r.get("loss_scale"), r.get("skipped_steps")) for r in records] == [(32768.0, 2), (32768.0, 0),
                                                                                (None, None)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/skipped_steps")] == [(1, 2.0), (2, 0.0)]
    assert [e.value for e in events.Scalars("train/loss_scale")] == [32768.0, 32768.0]


def _train_step_report(precision, engine, log_step=True, loss=1.0, zero_stage=1):
    """What `TrainingRun._log_train_step` hands the monitor, for an engine stub at `precision`."""
    from m2r.engine.monitor import StepTimer
    from m2r.engine.run import TrainingRun

    logged = []
    train = SimpleNamespace(precision=precision, zero_stage=zero_stage)
    stub = SimpleNamespace(step=4, engine=engine, cfg=SimpleNamespace(train=train),
                           _skipped_steps_logged=1, monitor=SimpleNamespace(
                               log_train=lambda step, scalars, log_step: logged.append(scalars),
                               advance=lambda step: None))
    stub._loss_scaling = lambda: TrainingRun._loss_scaling(stub)
    stub._stop_if_weights_took_a_non_finite_step = lambda loss: \
        TrainingRun._stop_if_weights_took_a_non_finite_step(stub, loss)
    TrainingRun._log_train_step(stub, torch.tensor([loss, loss, 0.0]), 1e-3, StepTimer(), log_step)
    return logged[0]


def test_fp32_at_zero_0_stops_at_a_non_finite_loss_after_logging_it_other_settings_go_on():
    """Its DeepSpeed optimizer applies inf/NaN gradients (the others skip the step): the run would save NaN weights
    and exit 0. The step's record is written first."""
    engine = SimpleNamespace(get_global_grad_norm=lambda: None, skipped_steps=0,
                             optimizer=SimpleNamespace(loss_scale=1.0))
    with pytest.raises(FloatingPointError, match="step 4: the loss is nan and at train.zero_stage=0 in fp32"):
        _train_step_report("fp32", engine, log_step=False, loss=float("nan"), zero_stage=0)
    assert _train_step_report("fp32", engine, log_step=False, loss=1.0, zero_stage=0)["loss"] == 1.0
    for precision, zero_stage in (("fp32", 1), ("bf16", 2), ("fp16", 0)):
        report = _train_step_report(precision, engine, log_step=False, loss=float("inf"), zero_stage=zero_stage)
        assert report["loss"] == float("inf")


def test_only_fp16_log_steps_read_the_loss_scaling():
    """bf16 runs also have a ZeRO optimizer with a loss_scale (1): it is not reported; nor on other steps."""
    engine = SimpleNamespace(get_global_grad_norm=lambda: 0.5, skipped_steps=3,
                             optimizer=SimpleNamespace(loss_scale=1024))
    assert _train_step_report("fp16", engine)["skipped_steps"] == 2   # 1 of the 3 was before the last log step
    assert _train_step_report("fp16", engine)["loss_scale"] == 1024.0
    assert "loss_scale" not in _train_step_report("fp16", engine, log_step=False)
    for precision in ("bf16", "fp32"):
        assert not {"loss_scale", "skipped_steps"} & set(_train_step_report(precision, engine))


def _stopped_run_reports(run_dir, precision, skipped_now, skipped_at_the_last_log):
    """What `TrainingRun._finish` writes for a run stopped at step 7 (its checkpoint saved), log steps every 5, with
    DeepSpeed's count of skipped steps at `skipped_now`: metrics.jsonl's records and the console's lines."""
    from m2r.engine.run import TrainingRun

    engine = SimpleNamespace(skipped_steps=skipped_now, optimizer=SimpleNamespace(loss_scale=2.0**14))
    stub = SimpleNamespace(step=7, engine=engine, cfg=SimpleNamespace(train=SimpleNamespace(precision=precision)),
                           _skipped_steps_logged=skipped_at_the_last_log, _tell_the_job_script=lambda finished: None,
                           monitor=Monitor(run_dir, total_steps=10, start_step=0, world_size=1,
                                           progress_bar=False))
    stub._loss_scaling = lambda: TrainingRun._loss_scaling(stub)
    stub._report_steps_skipped_since_the_last_log = lambda: TrainingRun._report_steps_skipped_since_the_last_log(stub)
    TrainingRun._finish(stub, "run.stop_after_steps=7 reached", finished=False)
    return read_records(run_dir / "metrics.jsonl"), stub


def test_an_fp16_run_stopped_between_log_steps_reports_the_steps_skipped_since_the_last_one(tmp_path, capsys):
    """A stop signal or a run.stop_after_* limit between log steps: the steps DeepSpeed skipped since the last one
    (2 of the 3 here) are in no step line; the run's last step reports them, in a metrics.jsonl record, TensorBoard
    and a console line of their own, and none twice. The count is DeepSpeed's, the same on every rank."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records, stub = _stopped_run_reports(tmp_path, "fp16", skipped_now=3, skipped_at_the_last_log=1)
    assert records == [{"step": 7, "loss_scale": 2.0**14, "skipped_steps": 2}]
    assert capsys.readouterr().out.splitlines() == [
        "step 7: skipped 2 since the last log step (fp16 overflow, scale 16384)",
        "stopping at step 7: run.stop_after_steps=7 reached"]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/skipped_steps")] == [(7, 2.0)]
    assert stub._skipped_steps_logged == 3


@pytest.mark.parametrize("precision, skipped_now", [("fp16", 1), ("bf16", 1), ("fp32", 0)])
def test_a_run_with_no_skipped_steps_left_to_report_ends_as_before(tmp_path, capsys, precision, skipped_now):
    """None since the last log step (stopped at a log step, whose line had them), or not fp16 (bf16's optimizer has
    a loss_scale of 1, never reported): no record and no line."""
    records, _ = _stopped_run_reports(tmp_path, precision, skipped_now, skipped_at_the_last_log=1)
    assert records == []
    assert capsys.readouterr().out.splitlines() == ["stopping at step 7: run.stop_after_steps=7 reached"]


def test_fp16_runs_report_deepspeeds_skipped_steps_and_lowered_loss_scale_at_every_zero_stage(tmp_path, repo_root):
    """A real fp16 engine per ZeRO stage (tests/fp16_overflow_report.py): two overflowing steps, then a clean
    one. ZeRO 0 wraps AdamW in DeepSpeed's unfused optimizer, which halves the scale at every overflow; ZeRO
    1 and 2 in its ZeRO optimizer, which waits for a second overflow (m2r's hysteresis 2)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "tests/fp16_overflow_report.py", str(tmp_path)], cwd=repo_root,
                            capture_output=True, text=True, timeout=300,
                            env=dict(env, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                                     PYTHONPATH=os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))))
    assert result.returncode == 0, result.stderr[-3000:]
    for stage, lowered in ((0, 2.0**14), (1, 2.0**15), (2, 2.0**15)):
        records = read_records(tmp_path / f"zero{stage}/metrics.jsonl")
        assert [(r["step"], r.get("skipped_steps"), r.get("loss_scale")) for r in records] == [
            (1, None, None), (2, 2, lowered), (3, 0, lowered)], f"ZeRO {stage}"
        assert f"| skipped 2 (fp16 overflow, scale {lowered:.0f}) |" in result.stdout


def test_a_line_cut_off_by_a_crash_goes_before_the_resumed_run_appends(tmp_path):
    """Only the cut line is extra (the crash came right after the checkpoint's step was logged): the
    file is still rewritten, or the next record would be glued to the cut line."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    monitor = Monitor(tmp_path, total_steps=3, start_step=1, world_size=1, progress_bar=False, tensorboard=False)
    monitor.log_train(2, dict(SCALARS, loss=2.0), log_step=False)
    monitor.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0)]


def test_the_training_loop_reports_img_per_s_without_the_validation_and_checkpoint_time(monkeypatch):
    from m2r.engine import monitor as monitor_module
    from m2r.engine import trainer as trainer_module

    clock = _Clock()
    monkeypatch.setattr(monitor_module, "time", clock)
    monkeypatch.setattr(trainer_module, "time", clock)
    reported, stops = [], iter([None, None, "finished"])   # at the start, after steps 1 and 2

    def train_step(timer):
        clock.now += 1.0            # a training step: 1 s
    def periodic_work():
        clock.now += 10.0           # validation and a checkpoint: 10 s
        return True

    stub = SimpleNamespace(
        step=0, last_val_step=0, engine=SimpleNamespace(train=lambda: None),
        stop_request=SimpleNamespace(agreed_signal=None, agreed_reason=lambda: None),
        _finished=lambda: False,
        _start_of_run_work=lambda: False, train_step=train_step,
        _report_step=lambda result, timer: timer.end_step(4) or reported.append(timer.take()),   # 4 images a step
        _periodic_work=periodic_work, _planned_stop_reason=lambda steps, finished: next(stops),
        save_checkpoint=lambda: None, _finish=lambda *args, **kwargs: None, _demo_summary=lambda: [])
    trainer_module.Trainer._train(stub)
    assert [r["img_per_s"] for r in reported] == pytest.approx([4.0, 4.0])   # 4 images per 1 s step, both steps


def test_a_resume_cuts_the_metrics_file_in_place_and_the_loss_average_continues_over_its_last_100_steps(tmp_path):
    """The file is cut where the resumed run starts logging (not rewritten: at 226k steps it is about 40 MB);
    validation records between the training records do not count towards the 100."""
    path = tmp_path / "metrics.jsonl"
    records = [r for step in range(1, 301) for r in
               ([{"step": step, "loss": float(step)}] + ([{"step": step, "val_psnr": 20.0}] if step % 10 == 0 else []))]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    inode = path.stat().st_ino
    monitor = Monitor(tmp_path, total_steps=300, start_step=250, world_size=1, progress_bar=False, tensorboard=False)
    monitor.log_train(251, dict(SCALARS, loss=251.0), log_step=False)
    monitor.close()
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert path.stat().st_ino == inode
    assert written[:-1] == [r for r in records if r["step"] <= 250]
    assert written[-1]["loss_avg"] == pytest.approx(sum(range(152, 252)) / 100)


def test_a_resume_keeps_the_records_of_a_metrics_file_another_tool_rewrote(tmp_path):
    """`jq -c . metrics.jsonl > tmp && mv tmp metrics.jsonl` writes compact lines (`{"step":1,...}`): records
    all the same, which a resume must not cut away; a line that is no record still marks the cut."""
    from m2r.engine.monitor import cut_metrics

    path = tmp_path / "metrics.jsonl"
    compact = "".join(json.dumps({"step": s, "loss": float(s)}, separators=(",", ":")) + "\n" for s in range(1, 6))
    path.write_text(compact)
    assert cut_metrics(path, 4) == ([1.0, 2.0, 3.0], None)
    assert path.read_text() == "".join(compact.splitlines(keepends=True)[:3])
    path.write_text(compact + "\x00\x00\x00\n" + compact)
    assert cut_metrics(path, 99) == ([1.0, 2.0, 3.0, 4.0, 5.0], None)
    assert path.read_text() == compact


def _damage_stub(own_notes, printed, logged):
    from m2r.engine import trainer as trainer_module

    stub = SimpleNamespace(step=10, stream=SimpleNamespace(
        stats=lambda: {"samples_by_type": {"rain": 4, "snow": 2}, "corrupt_samples": len(own_notes)},
        take_damage_notes=lambda: list(own_notes)),
        monitor=SimpleNamespace(print=printed.append, log_data_stats=lambda *args: logged.append(args)))
    stub._report_damage = lambda notes_by_rank, corrupt: trainer_module.Trainer._report_damage(stub, notes_by_rank,
                                                                                               corrupt)
    return stub


def test_a_rank_without_damage_notes_joins_the_gather_when_another_rank_has_some(monkeypatch):
    """The gather is a collective: a rank deciding by its own notes (none here) would skip it while rank 0,
    which skipped 2 damaged samples, waits in it for ever."""
    from m2r.engine import trainer as trainer_module

    other_ranks = torch.tensor([4, 2, 2, 2], dtype=torch.float64)   # rank 0: samples by type, corrupt, notes
    gathered, printed, logged = [], [], []
    monkeypatch.setattr(trainer_module.dist, "is_rank0", lambda: False)   # this stub is rank 1
    monkeypatch.setattr(trainer_module.dist, "rank", lambda: 1)
    monkeypatch.setattr(trainer_module.dist, "all_reduce_sum", lambda t: t + other_ranks)
    monkeypatch.setattr(trainer_module.dist, "all_gather_object",
                        lambda notes: gathered.append(notes) or [["shard a.tar: sample 1", "shard a.tar: sample 2"],
                                                                  notes])
    trainer_module.Trainer._log_run_stats(_damage_stub([], printed, logged))
    assert gathered == [[]] and logged == [(10, {"rain": 8, "snow": 4}, 2)]
    assert "rank 0: shard a.tar: sample 2" in printed[0] and "rank 1" not in printed[0]
    gathered.clear()   # no notes on any rank: no gather at all
    monkeypatch.setattr(trainer_module.dist, "all_reduce_sum", lambda t: t)
    trainer_module.Trainer._log_run_stats(_damage_stub([], printed, logged))
    assert gathered == []


def test_the_console_names_at_most_max_damage_lines_damaged_samples_over_all_ranks():
    """64 ranks x 3 notes would be 192 console lines at every log step."""
    from m2r.engine.trainer import MAX_DAMAGE_LINES, Trainer

    printed = []
    stub = SimpleNamespace(step=10, monitor=SimpleNamespace(print=printed.append))
    Trainer._report_damage(stub, [[f"shard {r}.tar: sample {i}" for i in range(3)] for r in range(64)], 500)
    lines = printed[0].splitlines()
    assert len([line for line in lines if line.startswith("  rank ")]) == MAX_DAMAGE_LINES
    assert lines[-1] == f"  ... and {64 * 3 - MAX_DAMAGE_LINES} more"   # rank 2's third note among them
    assert "500 since the stream started" in lines[0]


def test_a_validation_redone_at_the_resume_step_and_logged_by_an_earlier_run_is_not_logged_twice(tmp_path):
    """A stop signal at step 4 skipped its validation; the next run resumed at step 4, validated it, and was
    killed at step 5 before its next checkpoint; the run after it resumes at step 4 and validates again:
    metrics.jsonl and TensorBoard keep one validation record at step 4."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train = {"pixel_loss": 0.0, "balance_loss": 0.0, "lr": 1e-3, "img_per_s": 1.0, "data_wait_share": 0.0}
    monitor = Monitor(tmp_path, total_steps=8, start_step=0, world_size=1, progress_bar=False)
    for step in range(1, 5):
        monitor.log_train(step, dict(train, loss=float(step)), log_step=True)
    monitor.close()
    for killed in (True, False):   # the run killed at step 5, then the one that finishes
        monitor = Monitor(tmp_path, total_steps=8, start_step=4, world_size=1, progress_bar=False)
        monitor.log_val(4, {"psnr": 20.0, "ssim": 0.5})
        for step in range(5, 6 if killed else 9):
            monitor.log_train(step, dict(train, loss=float(step)), log_step=True)
        monitor.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_psnr" in r] == [4]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/psnr")] == [4]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))


def test_non_finite_values_are_written_as_standard_json_and_read_back_at_a_resume(tmp_path):
    """A diverged loss or validation is "NaN"/"Infinity"/"-Infinity" in metrics.jsonl, which a strict parser
    (one that refuses Python's bare NaN tokens) reads; the resumed run's running average takes them back as
    floats, so it goes on as the uninterrupted run's would (Infinity, not NaN)."""
    def strict(text):
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))

    monitor = Monitor(tmp_path, total_steps=3, start_step=0, world_size=1, progress_bar=False, tensorboard=False)
    monitor.log_train(1, dict(SCALARS, loss=float("inf"), pixel_loss=float("nan"), balance_loss=float("-inf")),
                      log_step=False)
    monitor.log_val(1, {"psnr": float("nan"), "ssim": 0.5})
    monitor.close()
    records = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (records[0]["loss"], records[0]["pixel_loss"], records[0]["balance_loss"]) == ("Infinity", "NaN",
                                                                                         "-Infinity")
    assert records[1]["val_psnr"] == "NaN" and records[1]["val_ssim"] == 0.5
    resumed = Monitor(tmp_path, total_steps=3, start_step=1, world_size=1, progress_bar=False, tensorboard=False)
    resumed.log_train(2, dict(SCALARS, loss=1.0), log_step=False)
    resumed.close()
    assert strict((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["loss_avg"] == "Infinity"


def test_the_skipped_steps_are_worded_once_for_the_log_step_line_and_the_last_steps_line():
    """`skipped N (fp16 overflow, scale S)` (README), with the last step's 'since the last log step' after N."""
    from m2r.engine.monitor import skipped_steps_text

    scaling = {"loss_scale": 16384.0, "skipped_steps": 2}
    assert skipped_steps_text(scaling) == "skipped 2 (fp16 overflow, scale 16384)"
    assert skipped_steps_text(scaling, " since the last log step") == ("skipped 2 since the last log step (fp16 "
                                                                       "overflow, scale 16384)")


def test_standard_json_reaches_the_non_finite_values_inside_a_records_lists():
    from m2r.engine.monitor import standard_json

    record = {"step": 1, "per_expert": [1.0, float("nan"), (float("-inf"), 2)]}
    assert json.dumps(standard_json(record), allow_nan=False) == (
        '{"step": 1, "per_expert": [1.0, "NaN", ["-Infinity", 2]]}')
