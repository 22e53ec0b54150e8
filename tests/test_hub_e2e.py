"""push_to_hub + from_pretrained(repo_id) end to end, against a Hub look-alike on 127.0.0.1.

``huggingface_hub`` reads ``HF_ENDPOINT`` when it is imported, so the client runs in a subprocess whose
environment points at the fake server (``tests/hub_server.py``), which runs in this process. The parent
builds and compresses the models, saves them locally with the inputs and the logits; the child reloads,
pushes, downloads by repo id and writes the logits of the downloaded model; the parent compares them
with ``torch.equal`` and inspects what the server stored.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from conftest import ROOT, compressed_model, logits, save_tiny_fmnist, subprocess_env
from hub_server import FakeHub
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from smooth_hf.checkpoint.compressed import save_pretrained
from smooth_hf.checkpoint.dense import save_dense
from smooth_hf.core.files import COMPRESSION_CONFIG_NAME, WEIGHTS_NAME

TOKEN = "hf_fake_token_for_tests"
USER = "fake-user"
CLIENT_TIMEOUT_S = 300  # two cores shared with other test processes: imports alone can take tens of seconds

PUSH_AND_DOWNLOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    import smooth_hf
    from smooth_hf import ModelCardInfo, from_pretrained, push_to_hub

    out = {}
    for case in json.loads(sys.argv[1]):
        model = from_pretrained(case["local"])
        url = push_to_hub(model, case["repo_id"], private=case["private"], model_card=ModelCardInfo(**case["card"]))
        inputs = load_file(case["io"])
        inputs.pop("logits")
        results = {}
        for name, revision in (("main", None), ("commit", url.rsplit("/", 1)[1])):
            loaded = smooth_hf.from_pretrained(case["repo_id"], revision=revision)  # as the model card says
            with torch.no_grad():
                results[name] = loaded(inputs["x"]) if "x" in inputs else loaded(**inputs).logits
        save_file(results, case["result"])
        # Pushing the same checkpoint again changes nothing: no empty commit, the same commit URL back.
        again = push_to_hub(model, case["repo_id"], model_card=ModelCardInfo(**case["card"]))
        out[case["repo_id"]] = {"url": url, "again": again, "class": type(loaded).__name__, "training": loaded.training}
    print("RESULT " + json.dumps(out))
    """
)

FAILING_PUSHES = textwrap.dedent(
    """
    import json, sys
    import huggingface_hub
    import torch
    from smooth_hf.hub import PushToHubError, from_pretrained, push_to_hub

    args = json.loads(sys.argv[1])
    model = from_pretrained(args["local"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    for repo_id, endpoint in args["cases"]:
        if endpoint is not None:  # the Hub is down: nothing listens at this address any more
            huggingface_hub.constants.ENDPOINT = endpoint
        try:
            push_to_hub(model, repo_id)
            out[repo_id] = {"raised": None}
        except PushToHubError as err:
            out[repo_id] = {"raised": type(err).__name__, "stage": err.stage, "message": str(err),
                            "cause": type(err.__cause__).__name__}
        out[repo_id]["model_unchanged"] = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    print("RESULT " + json.dumps(out))
    """
)


PUSH_TO_A_BRANCH = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    import smooth_hf

    args = json.loads(sys.argv[1])
    model = smooth_hf.from_pretrained(args["local"])
    # The branch does not exist yet, then it does: both pushes must work, the second changing nothing.
    urls = [smooth_hf.push_to_hub(model, args["repo_id"], revision="dev") for _ in range(2)]
    loaded = smooth_hf.from_pretrained(args["repo_id"], revision="dev")
    with torch.no_grad():
        save_file({"logits": loaded(load_file(args["io"])["x"])}, args["result"])
    print("RESULT " + json.dumps({"urls": urls}))
    """
)


PUSH_WITHOUT_A_REPORT = textwrap.dedent(
    """
    import json, sys
    import smooth_hf

    args = json.loads(sys.argv[1])
    model = smooth_hf.from_pretrained(args["local"])
    smooth_hf.push_to_hub(model, args["repo_id"])
    del model.lowrank_report  # as a model reloaded by an AutoModel class has none: the next push writes no report
    smooth_hf.push_to_hub(model, args["repo_id"])
    print("RESULT " + json.dumps({}))
    """
)


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    with FakeHub(tmp_path_factory.mktemp("hub"), token=TOKEN, user=USER) as hub:
        yield hub


def client_env(hub_url: str, workdir: Path) -> dict[str, str]:
    """The environment of a fresh interpreter that talks to ``hub_url`` as if it were the Hub."""
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in subprocess_env().items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=hub_url,
        HF_HUB_OFFLINE="0",
        HF_HOME=str(workdir / "hf_home"),
        HF_TOKEN=TOKEN,
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TMPDIR=str(workdir / "tmp"),  # lets the test check that push_to_hub cleans up after itself
        # Logits are compared bit for bit with this process's: the same thread count gives the same sums.
        OMP_NUM_THREADS=str(torch.get_num_threads()),
    )
    return env


def run_client(script: str, args: object, hub_url: str, workdir: Path) -> dict:
    """Run ``script`` in a fresh interpreter that talks to ``hub_url`` as if it were the Hub."""
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(args)],
        cwd=workdir,
        env=client_env(hub_url, workdir),
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"client failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


CASES = {
    # model, repo id, private, card info
    "timm-resnet14_cifar": (
        f"{USER}/resnet14-cifar-smooth",
        False,
        {
            "datasets": ["zalando-datasets/fashion_mnist"],
            "metrics": {"accuracy": 0.5},
            "task": "image-classification",
        },
    ),
    "vit": (f"{USER}/vit-tiny-smooth", True, {"license": "apache-2.0"}),
}


def test_push_then_download_by_repo_id(fake_hub, tmp_path):
    cases = []
    for name, (repo_id, private, card) in CASES.items():
        model, inputs = compressed_model(name)
        local = save_pretrained(model, tmp_path / "local" / name)
        save_file({**inputs, "logits": logits(model, inputs)}, tmp_path / f"{name}-io.safetensors")
        cases.append(
            {
                "local": str(local),
                "repo_id": repo_id,
                "private": private,
                "card": card,
                "io": str(tmp_path / f"{name}-io.safetensors"),
                "result": str(tmp_path / f"{name}-out.safetensors"),
            }
        )

    out = run_client(PUSH_AND_DOWNLOAD, cases, fake_hub.url, tmp_path)

    for case, (name, (repo_id, private, card)) in zip(cases, CASES.items(), strict=True):
        expected = load_file(case["io"])["logits"]
        got = load_file(case["result"])
        assert torch.equal(got["main"], expected), f"{name}: downloaded model differs from the saved one"
        assert torch.equal(got["commit"], expected), f"{name}: download by commit id differs"
        assert out[repo_id]["url"].startswith(f"{fake_hub.url}/{repo_id}/commit/")
        assert out[repo_id]["training"] is False
        assert out[repo_id]["again"] == out[repo_id]["url"]
        assert len(fake_hub.repos[("model", repo_id)].commits) == 2, "initial commit + one upload"

        files = fake_hub.files(repo_id)
        assert set(files) == {
            ".gitattributes",
            WEIGHTS_NAME,
            "config.json",
            COMPRESSION_CONFIG_NAME,
            "compression_report.json",
            "README.md",
        }
        local = Path(case["local"])
        for file in (WEIGHTS_NAME, "config.json", COMPRESSION_CONFIG_NAME):  # the pushed checkpoint is the saved one
            assert files[file] == (local / file).read_bytes(), f"{name}: {file} changed on the way"
        readme = files["README.md"].decode()
        assert f'smooth_hf.from_pretrained("{repo_id}")' in readme
        card_data = ModelCard(readme).data
        assert card_data.library_name == "smooth_hf"
        if "metrics" in card:
            assert card_data.eval_results[0].metric_value == 0.5
        assert fake_hub.repos[("model", repo_id)].private is private

        # Downloads went through the client's cache, and nothing else was fetched.
        snapshots = tmp_path / "hf_home" / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots"
        (snapshot,) = snapshots.iterdir()
        assert {p.name for p in snapshot.iterdir()} == set(files) - {".gitattributes"}

    called = fake_hub.endpoints_called()
    assert {"create", "validate-yaml", "preupload", "commit", "info", "tree", "resolve"} <= called
    assert "unknown" not in called, [r for r in fake_hub.requests if r[1] == "unknown"]
    assert list((tmp_path / "tmp").iterdir()) == [], "push_to_hub left temporary files behind"


def test_failed_push_is_clear_and_touches_nothing(fake_hub, tmp_path):
    model, _ = compressed_model("timm-resnet14_cifar")
    local = save_pretrained(model, tmp_path / "local")
    before = digest(local)

    dead = FakeHub(tmp_path / "dead").start()
    dead_url = dead.url
    dead.stop()

    fake_hub.fail[f"create:{USER}/fails-at-create"] = 500
    # Write access refused on an existing repo: 403 is not retried, unlike a 500 on the upload endpoints,
    # which huggingface_hub retries with backoff for ~20 s before giving up.
    fake_hub.fail[f"commit:{USER}/fails-at-upload"] = 403
    try:
        out = run_client(
            FAILING_PUSHES,
            {
                "local": str(local),
                "cases": [
                    [f"{USER}/fails-at-create", None],
                    [f"{USER}/fails-at-upload", None],
                    [f"{USER}/hub-is-down", dead_url],
                ],
            },
            fake_hub.url,
            tmp_path,
        )
    finally:
        fake_hub.fail.clear()

    create, upload, down = (out[f"{USER}/{name}"] for name in ("fails-at-create", "fails-at-upload", "hub-is-down"))
    assert create["raised"] == "PushToHubError" and create["stage"] == "create_repo"
    assert "could not create or access the repo" in create["message"] and "500" in create["message"]
    assert upload["raised"] == "PushToHubError" and upload["stage"] == "upload"
    assert "uploading the checkpoint failed" in upload["message"] and "403" in upload["message"]
    assert down["raised"] == "PushToHubError" and down["stage"] == "create_repo"
    assert dead_url in down["message"]
    assert all(result["model_unchanged"] for result in out.values())

    assert digest(local) == before, "a failed push changed the caller's files"
    assert list((tmp_path / "tmp").iterdir()) == [], "a failed push left temporary files behind"
    assert (("model", f"{USER}/fails-at-create")) not in fake_hub.repos
    assert fake_hub.files(f"{USER}/fails-at-upload").keys() == {".gitattributes"}, "nothing may be committed"


def test_push_to_a_branch_leaves_main_alone(fake_hub, tmp_path):
    model, inputs = compressed_model("timm-resnet14_cifar")
    local = save_pretrained(model, tmp_path / "local")
    save_file({"x": inputs["x"]}, tmp_path / "io.safetensors")
    repo_id = f"{USER}/on-a-branch"
    out = run_client(PUSH_TO_A_BRANCH, {"local": str(local), "repo_id": repo_id, "io": str(tmp_path / "io.safetensors"),
                                        "result": str(tmp_path / "out.safetensors")}, fake_hub.url, tmp_path)

    repo = fake_hub.repos[("model", repo_id)]
    first, second = out["urls"]
    assert first == second == f"{fake_hub.url}/{repo_id}/commit/{repo.branches['dev']}"
    assert set(fake_hub.files(repo_id)) == {".gitattributes"}, "the push went to main"
    on_dev = fake_hub.files(repo_id, revision="dev")
    for file in (WEIGHTS_NAME, "config.json", COMPRESSION_CONFIG_NAME):
        assert on_dev[file] == (local / file).read_bytes()
    assert torch.equal(load_file(tmp_path / "out.safetensors")["logits"], logits(model, inputs))
    assert "branch" in fake_hub.endpoints_called()


def test_compress_recipe_pushes_what_it_saved(fake_hub, tmp_path):
    """`python recipes/compress.py ... --push_to_hub --hub_model_id ...`, as the recipe's docstring shows."""
    torch.manual_seed(0)
    dense = timm.create_model("resnet14_cifar", in_chans=1, num_classes=3, channels=(4, 8, 8), layers=(1, 1, 1))
    save_dense(dense, tmp_path / "dense")
    repo_id = f"{USER}/recipe-push"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "compress.py"), "--model_name_or_path", str(tmp_path / "dense"),
         "--dataset_name", save_tiny_fmnist(tmp_path / "tiny"), "--rank_ratio", "0.5", "--output_dir",
         str(tmp_path / "out"), "--push_to_hub", "--hub_model_id", repo_id],
        cwd=tmp_path, env=client_env(fake_hub.url, tmp_path), capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    repo = fake_hub.repos[("model", repo_id)]
    assert f"pushed: {fake_hub.url}/{repo_id}/commit/{repo.branches['main']}" in proc.stdout
    files = fake_hub.files(repo_id)
    for file in (WEIGHTS_NAME, "config.json", COMPRESSION_CONFIG_NAME):  # what the recipe saved locally is what it pushed
        assert files[file] == (tmp_path / "out" / file).read_bytes()
    local_card, pushed_card = ModelCard((tmp_path / "out" / "README.md").read_text()), ModelCard(files["README.md"].decode())
    assert pushed_card.data.eval_results[0].metric_value == local_card.data.eval_results[0].metric_value
    assert f'smooth_hf.from_pretrained("{repo_id}")' in pushed_card.text


def test_a_push_removes_what_an_earlier_push_left_and_this_one_does_not_write(fake_hub, tmp_path):
    """An earlier push's compression_report.json would describe another model than the weights now there (a local
    save removes it in the same way)."""
    model, _ = compressed_model("timm-resnet14_cifar")
    local = save_pretrained(model, tmp_path / "local")
    repo_id = f"{USER}/resnet14-pushed-twice"
    run_client(PUSH_WITHOUT_A_REPORT, {"local": str(local), "repo_id": repo_id}, fake_hub.url, tmp_path)
    files = fake_hub.files(repo_id)
    assert "compression_report.json" not in files and {WEIGHTS_NAME, "config.json", COMPRESSION_CONFIG_NAME, "README.md"} <= set(files)

