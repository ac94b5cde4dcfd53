from tests.conftest import SEED_CLAIM_URL


def test_seed_url_claims_task_created_through_api(client, task_factory, runner):
    session = task_factory(message="hi")
    response = client.get(SEED_CLAIM_URL, headers=runner)
    assert response.status_code == 200
    assert response.json["task"]["session_id"] == session["id"]
