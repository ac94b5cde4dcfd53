"""Claim URLs: HELIX_GET_JOB_URL split into the API's base URL and the filters."""

from __future__ import annotations

import pytest

from runner.config import JobFilter, normalize_api_url, parse_job_url


def test_seed_job_url_parses_verbatim():
    url = "http://host:8080/api/v1/worker/task?mode=Create&type=Text&model_name=mistralai/Mistral-7B-Instruct-v0.1"
    assert parse_job_url(url) == JobFilter(api_url="http://host:8080", mode="create", type="text",
                                           model_name="mistralai/Mistral-7B-Instruct-v0.1")


def test_model_name_keeps_its_case_and_may_be_percent_encoded():
    found = parse_job_url("https://h/api/v1/worker/task?mode=FINETUNE&type=image"
                          "&model_name=stabilityai%2FSDXL-Base&wait=15")
    assert (found.mode, found.type, found.model_name, found.wait) == (
        "finetune", "image", "stabilityai/SDXL-Base", 15.0)


def test_prefix_before_the_claim_path_is_part_of_the_base():
    found = parse_job_url("http://proxy/helix/api/v1/worker/task/?mode=create&type=text&model_name=m")
    assert found.api_url == "http://proxy/helix"


def test_missing_filters_are_none():
    found = parse_job_url("http://h:1/api/v1/worker/task")
    assert (found.mode, found.type, found.model_name, found.wait) == (None, None, None, None)


@pytest.mark.parametrize("url", ["host:8080/api/v1/worker/task", "http://h/api/v1/sessions?mode=create"])
def test_not_a_claim_url_is_rejected(url):
    with pytest.raises(ValueError):
        parse_job_url(url)


@pytest.mark.parametrize("url", ["http://h:8080", "http://h:8080/", "http://h:8080/api/v1", "http://h:8080/api/v1/"])
def test_api_url_normalized(url):
    assert normalize_api_url(url) == "http://h:8080"
