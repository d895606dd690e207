"""The `launcher` executor's step records and `runherd show`'s step view: the pure parts (issue 11)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from runherd import step_groups
from runherd.launchers.process import start_time
from runherd.stepview import executor_of, overrides_of, step_tries, tries_lines


def test_found_takes_a_result_first_then_adopts_a_live_group_else_starts_anew() -> None:
    record = {"pid": 1, "start_time": 5}
    assert step_groups.found(record, True, {"ok": True}) == step_groups.Found(record, result={"ok": True})
    assert step_groups.found(record, False, {"ok": False}).result == {"ok": False}
    assert step_groups.found(record, True, None) == step_groups.Found(record, adopt=True)
    assert step_groups.found(record, False, None) == step_groups.Found()
    assert step_groups.found(None, False, None) == step_groups.Found()


def test_file_names_for_any_step_key_are_distinct() -> None:
    assert step_groups.name("a/b") != step_groups.name("a_b")
    assert "/" not in step_groups.name("../../etc/passwd")


def test_look_and_reap_spare_the_groups_of_a_newer_attempt(tmp_path: Path) -> None:
    procs = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(2)]
    try:
        for owner, proc in zip((1, 2), procs, strict=True):
            record = {"pid": proc.pid, "start_time": start_time(proc.pid), "owner_attempt": owner}
            step_groups.write_json(step_groups.record_path(tmp_path, f"s{owner}", 1), record)
        assert step_groups.look(tmp_path, "s1", 1).adopt
        assert step_groups.look(tmp_path, "s1", 2) == step_groups.Found()
        assert step_groups.reap(tmp_path, 1) == [procs[0].pid]
        procs[0].wait(5)
        assert not step_groups.look(tmp_path, "s1", 1).adopt
        assert step_groups.look(tmp_path, "s2", 1).adopt  # owned by attempt 2: spared
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)


def test_step_dir_is_beside_the_worker_record() -> None:
    env = {"RUNHERD_WORKER_RECORD": "/var/logs/r1/attempt-2.worker"}
    assert step_groups.step_dir("r1", env) == Path("/var/logs/r1/steps")
    assert step_groups.step_dir("r1", {"RUNHERD_STEP_DIR": "/x"}) == Path("/x")
    assert str(step_groups.step_dir("r1", {})).endswith(os.path.join("runherd-steps", "r1"))


def _e(type_: str, attempt: int, step: str | None = "a", message: str | None = None, **data: object) -> dict:
    return {"type": type_, "attempt": attempt, "step_key": step, "message": message, "data": data, "refused": None}


def test_step_tries_with_reasons_handles_and_an_interrupted_try() -> None:
    events = [
        _e("RUN_START", 1, None, executor="launcher", max_concurrent=4),
        _e("STEP_START", 1, **{"try": 1, "handle": {"pid": 7}}),
        _e("STEP_UP_FOR_RETRY", 1, **{"try": 1, "reason": "exited with code 1", "delay_seconds": 2}),
        _e("STEP_RESTARTED", 1, **{"try": 2}),
        _e("STEP_RESTARTED", 2, **{"try": 2, "handle": {"pid": 9, "adopted": True}}),
        _e("STEP_SUCCESS", 2, **{"try": 2}),
        {**_e("STEP_FAILURE", 1, message="late"), "refused": "attempt 1 is not the current attempt (2)"},
        _e("REEXECUTED", 0, None, overrides={"with": ["a=retry:2"]}),
    ]
    tries = step_tries(events)["a"]
    assert [(t["try"], t["attempt"], t["status"]) for t in tries] == [
        (1, 1, "FAILURE"),
        (2, 1, "INTERRUPTED"),
        (2, 2, "SUCCESS"),
    ]
    assert tries[0]["reason"] == "exited with code 1" and tries[0]["handle"] == {"pid": 7}
    assert executor_of(events) == {"name": "launcher", "max_concurrent": 4}
    assert overrides_of(events) == {"with": ["a=retry:2"]}
    lines = tries_lines({"a": tries})
    assert lines[0] == "  a  try 1 (attempt 1) FAILURE: exited with code 1  handle {'pid': 7}"


def test_an_orphan_is_timed_from_when_the_last_worker_went() -> None:
    assert step_groups.orphaned_for(None, True, 10.0) is None
    assert step_groups.orphaned_for(None, False, 10.0) == 10.0
    assert step_groups.orphaned_for(10.0, False, 12.0) == 10.0
    assert step_groups.orphaned_for(10.0, True, 12.0) is None  # a resumed worker came: no longer an orphan


# --- the launcher executor on Docker: the pure parts -----------------------------------------------


def test_only_a_launcher_executor_run_on_docker_gets_a_step_launcher_in_its_plan() -> None:
    from runherd.execution import ExecutorName, step_launcher

    cfg = {"image": "img", "volumes": ["/a:/a:ro"]}
    assert step_launcher(ExecutorName.LAUNCHER, "docker", cfg) == {"name": "docker", "config": cfg}
    assert step_launcher(ExecutorName.MULTIPROCESS, "docker", cfg) is None
    assert step_launcher(ExecutorName.LAUNCHER, "process", {}) is None  # process groups there


def test_a_docker_worker_gets_the_engine_socket_and_its_steps_get_the_step_env_alone() -> None:
    from runherd.launchers.docker import parse_config
    from runherd.launchers.docker.steps import build_step_spec, step_container_name, worker_socket_bind

    assert worker_socket_bind("unix:///var/run/docker.sock") == (
        ["/var/run/docker.sock:/var/run/docker.sock"],
        {"RUNHERD_DOCKER_URL": "unix:///var/run/docker.sock"},
    )
    assert worker_socket_bind("tcp://10.0.0.1:2375") == ([], {"RUNHERD_DOCKER_URL": "tcp://10.0.0.1:2375"})
    cfg = parse_config({"image": "img", "env": {"FROM_CONFIG": "1"}, "volumes": ["/a:/a:ro"], "network": "n"})
    spec = build_step_spec(cfg, run_id="r", attempt=2, job="j", step_key="a/b", try_=3, env={"K": "V"}, python="/py")
    assert spec["Env"] == ["K=V"] and spec["Image"] == "img" and spec["HostConfig"]["Binds"] == ["/a:/a:ro"]
    assert spec["Cmd"] == ["/py", "-m", "runherd.worker.detached", "/.runherd/step.json", "/.runherd/result.json"]
    labels = spec["Labels"]
    assert (
        labels["runherd.run_id"],
        labels["runherd.attempt"],
        labels["runherd.step"],
        labels["runherd.step_try"],
    ) == (
        "r",
        "2",
        "a/b",
        "3",
    )
    name = step_container_name("r", step_groups.name("a/b"), 3)
    assert name.endswith("-3") and "/" not in name and name != step_container_name("r", step_groups.name("a_b"), 3)


def test_the_worker_keeps_its_engine_url_from_its_steps() -> None:
    from runherd.worker.main import step_environment

    assert step_environment({"RUNHERD_DOCKER_URL": "unix:///x", "PATH": "/bin"}) == {"PATH": "/bin"}


# --- the launcher executor on Kubernetes: the pure parts -------------------------------------------


def test_a_step_job_is_the_workers_manifest_running_the_detached_step_with_the_step_env() -> None:
    from runherd.launchers.kubernetes import validate_config
    from runherd.launchers.kubernetes.steps import build_step_job, step_job_name

    cfg = validate_config({"image": "img", "env": {"FROM_CONFIG": "1"}, "service_account_name": "runherd-worker"})
    body = build_step_job(cfg, run_id="R", attempt=2, job="j", step_key="a/b c", try_=3, env={"K": "V"}, python="/py")
    name = step_job_name("R", "a/b c", 3)
    assert body["metadata"]["name"] == name and len(name) <= 63 and name != step_job_name("R", "a/b_c", 3)
    pod = body["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["/py", "-m", "runherd.worker.detached", "/var/run/runherd/plan.json", "-"]
    assert container["env"] == [{"name": "K", "value": "V"}]  # the step's alone: no plan file, no config env
    assert pod["serviceAccountName"] == "runherd-worker" and pod["volumes"][0]["secret"]["secretName"] == name
    labels = body["metadata"]["labels"]
    assert (labels["runherd/attempt"], labels["runherd/step"], labels["runherd/step_try"]) == ("2", "a_b_c", "3")
    assert body["metadata"]["annotations"]["runherd/step_key"] == "a/b c"
    assert "activeDeadlineSeconds" not in body["spec"]  # the step's own timeout bounds it


def test_a_step_jobs_result_is_the_last_marked_line_of_its_log() -> None:
    from runherd.launchers.kubernetes.steps import result_from_log

    log = 'RUNHERD_STEP_RESULT {"ok": false}\nstep says hi\nRUNHERD_STEP_RESULT {"ok": true, "output": 1}\n'
    assert result_from_log(log) == {"ok": True, "output": 1}
    assert result_from_log("no result\n") is None
    assert result_from_log("RUNHERD_STEP_RESULT {not json\n") is None


def test_reap_deletes_a_runs_unfinished_step_jobs_unless_a_newer_worker_is_active() -> None:
    from runherd.launchers.kubernetes.steps import reap_decision

    def job(name: str, attempt: int, *, step: bool, done: bool = False, run_id: str = "R") -> dict[str, object]:
        labels = {"runherd/attempt": str(attempt), **({"runherd/step": "s"} if step else {})}
        status = {"conditions": [{"type": "Complete", "status": "True"}]} if done else {}
        meta = {"name": name, "labels": labels, "annotations": {"runherd/run_id": run_id}}
        return {"metadata": meta, "status": status}

    steps = [job("s1", 1, step=True), job("s2", 1, step=True, done=True), job("x", 1, step=True, run_id="other")]
    assert reap_decision([job("w1", 1, step=False), *steps], "R", 1) == ["s1"]
    assert reap_decision([job("w2", 2, step=False), *steps], "R", 1) == []  # attempt 2 adopted it
    assert reap_decision([job("w2", 2, step=False, done=True), *steps], "R", 1) == ["s1"]
    assert reap_decision(steps, "R", None) == ["s1"]
