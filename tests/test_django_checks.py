"""System checks and runtime errors for bad Stagehand settings."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from django_project.support import Process, manage

import stagehand
from stagehand_django import conf, lifecycle


def stagehand_errors() -> list[tuple[str, str, str]]:
    return [
        (message.id, message.msg, message.hint)
        for message in checks.run_checks()
        if message.id and message.id.startswith("stagehand.")
    ]


def test_valid_settings_pass() -> None:
    assert stagehand_errors() == []


@override_settings(STAGEHAND=["queues"])
def test_stagehand_must_be_a_dict() -> None:
    assert stagehand_errors() == [
        (
            "stagehand.E001",
            "STAGEHAND must be a dict; got ['queues']",
            'Write STAGEHAND = {"queues": {"default": 10}}, or remove it.',
        )
    ]


@override_settings(STAGEHAND={"queue": {"default": 2}, "name": "shop"}, TASKS={})
def test_unknown_keys_and_name_are_reported() -> None:
    errors = stagehand_errors()
    assert [error[0] for error in errors] == ["stagehand.E003", "stagehand.E002"]
    assert errors[0][1] == "STAGEHAND has an unknown key 'queue'"
    assert "queues" in errors[0][2]
    assert errors[1][1] == "STAGEHAND['name'] cannot be set; got 'shop'"


@override_settings(
    STAGEHAND={
        "queues": {"default": 0},
        "testing": "sometimes",
        "shutdown_grace_period": -1,
        "plugins": ["no.such.Plugin"],
    }
)
def test_each_bad_value_gets_its_own_error_naming_key_and_value() -> None:
    errors = stagehand_errors()
    assert [error[0] for error in errors] == ["stagehand.E004"] * 4
    messages = {error[1].split(" is invalid")[0]: error for error in errors}
    assert set(messages) == {
        "STAGEHAND['queues']",
        "STAGEHAND['testing']",
        "STAGEHAND['shutdown_grace_period']",
        "STAGEHAND['plugins']",
    }
    assert "got 0" in messages["STAGEHAND['queues']"][1]
    assert "got 'sometimes'" in messages["STAGEHAND['testing']"][1]
    assert "got -1" in messages["STAGEHAND['shutdown_grace_period']"][1]
    assert "'no.such.Plugin'" in messages["STAGEHAND['plugins']"][1]
    assert messages["STAGEHAND['testing']"][2] == (
        'Use "disabled" to run jobs, or "manual" or "inline" in tests.'
    )


@override_settings(
    STAGEHAND_AUTOSTART="yes",
    STAGEHAND_INSERT_ON_COMMIT=1,
    STAGEHAND_RUNTIME_DIR="relative/dir",
)
def test_flag_settings_are_checked() -> None:
    assert [(error[0], error[1]) for error in stagehand_errors()] == [
        (
            "stagehand.E005",
            "STAGEHAND_AUTOSTART must be None, True or False; got 'yes'",
        ),
        ("stagehand.E006", "STAGEHAND_INSERT_ON_COMMIT must be True or False; got 1"),
        (
            "stagehand.E007",
            "STAGEHAND_RUNTIME_DIR must be an absolute path; got 'relative/dir'",
        ),
    ]


@override_settings(STAGEHAND={"queues": {"mailers": 1}})
def test_task_backend_queues_must_be_configured() -> None:
    errors = stagehand_errors()
    assert [error[0] for error in errors] == ["stagehand.E008"]
    assert "['default']" in errors[0][1]


STAGEHAND_TASKS = {
    "default": {
        "BACKEND": "stagehand_django.tasks.StagehandBackend",
        "QUEUES": ["default", "mailers"],
    }
}


@override_settings(
    STAGEHAND={"queues": {"default": 1}},
    STAGEHAND_AUTOSTART="yes",
    TASKS=STAGEHAND_TASKS,
)
def test_task_queues_e008_beside_e005() -> None:
    assert [error[0] for error in stagehand_errors()] == [
        "stagehand.E005",
        "stagehand.E008",
    ]


@override_settings(STAGEHAND={"testing": "sometimes"}, TASKS=STAGEHAND_TASKS)
def test_task_queues_e008_beside_e004() -> None:
    # The queues are the default ones, which lack "mailers".
    assert [error[0] for error in stagehand_errors()] == [
        "stagehand.E004",
        "stagehand.E008",
    ]


@override_settings(STAGEHAND={"queues": {"default": 0}}, TASKS=STAGEHAND_TASKS)
def test_task_queues_unchecked_when_queues_invalid() -> None:
    # Without valid queues, the queues of TASKS cannot be compared.
    assert [error[0] for error in stagehand_errors()] == ["stagehand.E004"]


def stagehand_problems() -> list[tuple[str, str, str]]:
    # Only Stagehand's own checks: Django 6's check of TASKS fails with a
    # TypeError on a TASKS entry that is not a dict.
    return [(problem.id, problem.msg, problem.hint) for problem in conf.problems()]


@override_settings(TASKS={"default": "path.string"})
def test_task_entry_not_a_dict() -> None:
    assert stagehand_problems() == [
        (
            "stagehand.E010",
            "TASKS['default'] must be a dict of backend settings; got 'path.string'",
            "Write TASKS = {'default': {\"BACKEND\": "
            '"stagehand_django.tasks.StagehandBackend", "QUEUES": ["default"]}}.',
        )
    ]


@override_settings(
    TASKS={
        "default": {
            "BACKEND": "stagehand_django.tasks.StagehandBackend",
            "QUEUES": "mailers",
        }
    }
)
def test_task_queues_string() -> None:
    assert stagehand_errors() == [
        (
            "stagehand.E010",
            "TASKS['default']['QUEUES'] must be a list of queue names; got 'mailers'",
            'Write a list of Stagehand queue names, such as "QUEUES": '
            '["default", "mailers"], or remove QUEUES to use ["default"].',
        )
    ]


@override_settings(STAGEHAND={"testing": "sometimes"})
def test_runtime_start_raises_improperly_configured() -> None:
    with pytest.raises(
        ImproperlyConfigured, match=r"STAGEHAND\['testing'\].*'sometimes'"
    ):
        lifecycle.start()
    assert stagehand.default_instance() is None


@override_settings(STAGEHAND_AUTOSTART="yes")
def test_runtime_flag_error_raises_improperly_configured() -> None:
    with pytest.raises(ImproperlyConfigured, match="STAGEHAND_AUTOSTART"):
        conf.autostart()


@override_settings(STAGEHAND_AUTOSTRT=False, STAGEHANDX={"queues": {}})
def test_misspelled_setting_names_warn() -> None:
    found = {
        message.id: message
        for message in checks.run_checks()
        if message.id == "stagehand.W001"
    }
    messages = sorted(
        (message.msg, message.hint)
        for message in checks.run_checks()
        if message.id == "stagehand.W001"
    )

    assert isinstance(found["stagehand.W001"], checks.Warning)
    assert messages == [
        (
            "STAGEHANDX is not a Stagehand setting and is ignored",
            "Did you mean STAGEHAND?",
        ),
        (
            "STAGEHAND_AUTOSTRT is not a Stagehand setting and is ignored",
            "Did you mean STAGEHAND_AUTOSTART?",
        ),
    ]


CRON = "stagehand.plugins.Cron"
NOTE_WORKER = "django_project.shop.workers.NoteWorker"
PAIRS_HINT = "Use a list of (PluginClass or dotted path, options) pairs."
OPTIONS_HINT = (
    "Fix the plugin options that the message names; the list of "
    "(plugin, options) pairs itself is valid."
)


@override_settings(
    STAGEHAND={
        "queues": {"default": 1},
        "plugins": [
            (CRON, {"crontab": [("@daily", NOTE_WORKER, {"queue": "mailers"})]})
        ],
    },
    TASKS={},
)
def test_cron_queue_error_under_plugins() -> None:
    assert stagehand_errors() == [
        (
            "stagehand.E004",
            "STAGEHAND['plugins'] is invalid: crontab[0]: queue 'mailers' is not "
            "configured on instance 'default'; configured queues are ['default']. "
            "Add it to queues={...} or give the entry another 'queue' option.",
            "Add the queue to STAGEHAND['queues'], or change the plugin options "
            "to use a configured queue.",
        )
    ]


@pytest.mark.parametrize(
    ("plugins", "message"),
    [
        (
            [(CRON, {"crontab": [("bad cron", NOTE_WORKER)]})],
            "STAGEHAND['plugins'] is invalid: crontab[0]: invalid cron expression "
            "'bad cron': expected 5 fields (minute hour day-of-month month "
            "day-of-week), got 2",
        ),
        (
            [(CRON, {"crontab": [("@daily", "no.such.Worker")]})],
            "STAGEHAND['plugins'] is invalid: crontab[0]: cannot import worker "
            "path 'no.such.Worker': no module named 'no'",
        ),
        (
            [(CRON, {"bogus": 1})],
            "STAGEHAND['plugins'] is invalid: unknown Cron options ['bogus']; "
            "valid options are ['crontab', 'timezone']",
        ),
    ],
)
def test_plugin_option_errors_hint(plugins: list[object], message: str) -> None:
    with override_settings(STAGEHAND={"plugins": plugins}, TASKS={}):
        errors = stagehand_errors()
    assert len(errors) == 1
    assert errors[0][0] == "stagehand.E004"
    assert errors[0][1].startswith(message)
    assert errors[0][2] == OPTIONS_HINT


@pytest.mark.parametrize(
    "plugins",
    [
        "stagehand.plugins.Cron",
        [(CRON,)],
        [(CRON, 3)],
        ["no.such.Plugin"],
        [("stagehand.Stagehand", {})],
    ],
)
def test_malformed_plugin_list_hint(plugins: object) -> None:
    with override_settings(STAGEHAND={"plugins": plugins}, TASKS={}):
        errors = stagehand_errors()
    assert len(errors) == 1
    assert errors[0][0] == "stagehand.E004"
    assert errors[0][1].startswith("STAGEHAND['plugins'] is invalid: ")
    assert errors[0][2] == PAIRS_HINT


@pytest.mark.parametrize("path", ["stagehand.lock", "run/stagehand.lock"])
def test_relative_leader_lock_rejected(path: str) -> None:
    with override_settings(STAGEHAND={"leader_lock": path}, TASKS={}):
        errors = stagehand_errors()
    assert errors == [
        (
            "stagehand.E009",
            f"STAGEHAND['leader_lock'] must be an absolute path; got {path!r}",
            "Processes started from different directories would use different "
            "lock files and each lead cron. "
            'Use an absolute path, such as BASE_DIR / "stagehand.lock".',
        )
    ]


def test_absolute_leader_lock_passes(tmp_path: Path) -> None:
    lock = tmp_path / "stagehand.lock"
    queues = {"default": 1, "mailers": 1}
    with override_settings(STAGEHAND={"queues": queues, "leader_lock": lock}):
        assert stagehand_errors() == []


def test_relative_leader_lock_blocks_start() -> None:
    with (
        override_settings(STAGEHAND={"leader_lock": "stagehand.lock"}),
        pytest.raises(ImproperlyConfigured, match=r"\(stagehand\.E009\)$"),
    ):
        lifecycle.start()
    assert stagehand.default_instance() is None


FLAG_ERRORS = [
    (
        {"STAGEHAND_AUTOSTART": "yes"},
        "STAGEHAND_AUTOSTART must be None, True or False; got 'yes'. None lets the "
        "app decide per process; see docs/django.md. (stagehand.E005)",
    ),
    (
        {"STAGEHAND_INSERT_ON_COMMIT": 1},
        "STAGEHAND_INSERT_ON_COMMIT must be True or False; got 1. True makes "
        "job.insert() wait for the transaction to commit. (stagehand.E006)",
    ),
    (
        {"STAGEHAND_RUNTIME_DIR": "relative/dir"},
        "STAGEHAND_RUNTIME_DIR must be an absolute path; got 'relative/dir'. Use "
        "a directory only this user can write, or remove the setting. "
        "(stagehand.E007)",
    ),
]


@pytest.mark.parametrize(("flags", "error"), FLAG_ERRORS)
@pytest.mark.parametrize(
    "argv",
    [
        ["manage.py", "check"],
        ["manage.py", "test"],
        ["manage.py", "migrate"],
        ["manage.py", "runserver"],
        ["manage.py", "stagehand_worker"],
    ],
)
def test_install_silent_in_checking_commands(
    flags: dict[str, object],
    error: str,
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(sys, "argv", argv)
    with override_settings(**flags), caplog.at_level(logging.ERROR):
        lifecycle.install()
    assert caplog.messages == []
    assert stagehand.default_instance() is None


@pytest.mark.parametrize(("flags", "error"), FLAG_ERRORS)
@pytest.mark.parametrize(
    "argv",
    [
        ["manage.py", "shell"],
        ["manage.py", "migrate", "--skip-checks"],
        ["manage.py", "check", "--tag", "models"],
        ["gunicorn", "mysite.wsgi"],
    ],
)
def test_install_logs_where_no_check_runs(
    flags: dict[str, object],
    error: str,
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(sys, "argv", argv)
    with override_settings(**flags), caplog.at_level(logging.ERROR):
        lifecycle.install()
    assert caplog.messages == [
        f"Stagehand was not started: {error} Run manage.py check to list every mistake."
    ]


@pytest.mark.skipif(sys.platform == "win32", reason="process groups")
def test_check_prints_only_check_error() -> None:
    process = Process(manage("check"), {"STAGEHAND_TEST_AUTOSTART": "yes"})
    try:
        assert process.wait() == 1
    finally:
        process.kill()
    assert process.lines == [
        "SystemCheckError: System check identified some issues:",
        "",
        "ERRORS:",
        "?: (stagehand.E005) STAGEHAND_AUTOSTART must be None, True or False; "
        "got 'yes'",
        "\tHINT: None lets the app decide per process; see docs/django.md.",
        "",
        "System check identified 1 issue (0 silenced).",
    ]


def test_runtime_dir_under_a_file_e007(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    runtime = str(blocker / "runtime")
    with override_settings(STAGEHAND_RUNTIME_DIR=runtime):
        errors = stagehand_errors()
    assert errors == [
        (
            "stagehand.E007",
            f"STAGEHAND_RUNTIME_DIR cannot be created, because {str(blocker)!r} "
            f"is not a directory: {runtime!r}",
            "Use a directory only this user can write, or remove the setting.",
        )
    ]


def test_runtime_dir_under_a_file_install(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    runtime = str(blocker / "runtime")
    with override_settings(
        STAGEHAND={"queues": {"default": 1, "mailers": 1}},
        STAGEHAND_RUNTIME_DIR=runtime,
        STAGEHAND_AUTOSTART=True,
    ):
        try:
            # The app's ready() calls install(), which logs a settings error.
            with caplog.at_level(logging.ERROR):
                lifecycle.install()
            with pytest.raises(ImproperlyConfigured, match="STAGEHAND_RUNTIME_DIR"):
                lifecycle.start()
        finally:
            lifecycle.stop()
    assert len(caplog.messages) == 1
    assert caplog.messages[0].startswith(
        "Stagehand was not started: STAGEHAND_RUNTIME_DIR cannot be created"
    )
    assert stagehand.default_instance() is None


@pytest.mark.skipif(sys.platform == "win32", reason="process groups")
def test_check_reports_runtime_dir_under_a_file(tmp_path: Path) -> None:
    # With STAGEHAND_AUTOSTART = True, django.setup() used to raise
    # NotADirectoryError, so check could not run.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    runtime = str(blocker / "runtime")
    env = {"STAGEHAND_TEST_AUTOSTART": "true", "STAGEHAND_TEST_RUNTIME_DIR": runtime}
    process = Process(manage("check"), env)
    try:
        assert process.wait() == 1
    finally:
        process.kill()
    assert process.lines == [
        "SystemCheckError: System check identified some issues:",
        "",
        "ERRORS:",
        f"?: (stagehand.E007) STAGEHAND_RUNTIME_DIR cannot be created, because "
        f"{str(blocker)!r} is not a directory: {runtime!r}",
        "\tHINT: Use a directory only this user can write, or remove the setting.",
        "",
        "System check identified 1 issue (0 silenced).",
    ]


def test_default_runtime_dir_unusable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(conf.tempfile, "gettempdir", lambda: str(blocker))
    with override_settings(
        STAGEHAND={"queues": {"default": 1, "mailers": 1}},
        STAGEHAND_RUNTIME_DIR=None,
    ):
        directory = conf.runtime_dir()
        try:
            with pytest.raises(ImproperlyConfigured) as raised:
                lifecycle.start()
        finally:
            lifecycle.stop()
    assert str(raised.value) == (
        f"The default runtime directory {directory!r} cannot hold Stagehand's "
        f"control socket: [Errno 20] Not a directory: {directory!r}. Set "
        "STAGEHAND_RUNTIME_DIR to an absolute path that this user can create."
    )
    assert stagehand.default_instance() is None


@pytest.mark.parametrize("argv", [["manage.py", "runserver"], ["gunicorn"]])
def test_control_socket_error_logged(
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A directory where the control socket goes makes the plugin fail to
    # start. Checks cannot see it, so install() logs it in every process.
    runtime = tmp_path / "runtime"
    socket_path = runtime / f"{os.getpid()}.sock"
    socket_path.mkdir(parents=True)
    monkeypatch.setattr(sys, "argv", argv)
    with override_settings(
        STAGEHAND={"queues": {"default": 1, "mailers": 1}},
        STAGEHAND_RUNTIME_DIR=str(runtime),
        STAGEHAND_AUTOSTART=True,
    ):
        try:
            with caplog.at_level(logging.ERROR):
                lifecycle.install()
        finally:
            lifecycle.stop()
    # The instance also logs the plugin's error, with its traceback.
    logged = [
        record.getMessage()
        for record in caplog.records
        if record.name == "stagehand_django.lifecycle"
    ]
    assert logged == [
        f"Stagehand was not started: STAGEHAND_RUNTIME_DIR {str(runtime)!r} cannot "
        "hold Stagehand's control socket: [Errno 21] Is a directory: "
        f"{str(socket_path)!r}. Set STAGEHAND_RUNTIME_DIR to an absolute path that "
        "this user can create, or remove the setting to use the default."
    ]
    assert stagehand.default_instance() is None


CLUSTER = {"name": "shop", "secret": "a secret of enough length", "bind": "127.0.0.1:0"}


@override_settings(STAGEHAND={"cluster": CLUSTER}, TASKS={})
def test_cluster_setting_passes() -> None:
    assert stagehand_errors() == []


@override_settings(STAGEHAND={"cluster": CLUSTER, "testing": "manual"}, TASKS={})
def test_cluster_with_testing_mode_e004() -> None:
    assert stagehand_errors() == [
        (
            "stagehand.E004",
            "STAGEHAND['cluster'] needs testing='disabled'; got testing='manual'",
            "Remove 'cluster' from STAGEHAND in the settings that tests use, or "
            "set testing to 'disabled'.",
        )
    ]


@override_settings(
    STAGEHAND={"cluster": CLUSTER, "leader_lock": "/tmp/stagehand-test.lock"},
    TASKS={},
)
def test_cluster_with_leader_lock_e004() -> None:
    assert stagehand_errors() == [
        (
            "stagehand.E004",
            "STAGEHAND has both 'cluster' and 'leader_lock'",
            "Remove 'leader_lock': the peers of a cluster elect their cron leader "
            "themselves.",
        )
    ]


@override_settings(STAGEHAND={"cluster": {"name": "shop"}}, TASKS={})
def test_cluster_without_secret_e004() -> None:
    [(error_id, message, hint)] = stagehand_errors()
    assert error_id == "stagehand.E004"
    assert message.startswith("STAGEHAND['cluster'] is invalid: cluster secret")
    assert "docs/cluster.md" in hint


@override_settings(STAGEHAND={"cluster": CLUSTER, "testing": "disabled"}, TASKS={})
def test_cluster_instance_has_no_leader_lock(tmp_path: Path) -> None:
    with override_settings(STAGEHAND_RUNTIME_DIR=str(tmp_path / "run")):
        instance = lifecycle._build()
    assert instance.settings.leader_lock is None
    assert instance.check_cluster() is not None


def test_runtime_dir_shared_by_settings_modules() -> None:
    # A web and a worker settings module of one project share the control
    # sockets and the leader lock; another project does not.
    with override_settings(
        STAGEHAND_RUNTIME_DIR=None, SETTINGS_MODULE="django_project.settings"
    ):
        web = conf.runtime_dir()
    with override_settings(
        STAGEHAND_RUNTIME_DIR=None, SETTINGS_MODULE="django_project.worker_settings"
    ):
        worker = conf.runtime_dir()
    with override_settings(STAGEHAND_RUNTIME_DIR=None, BASE_DIR="/srv/other-project"):
        other = conf.runtime_dir()

    assert web == worker
    assert other != web
