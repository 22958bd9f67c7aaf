"""System checks and runtime errors for bad Stagehand settings."""

from __future__ import annotations

import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

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


@override_settings(STAGEHAND={"queue": {"default": 2}, "name": "shop"})
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
