"""Model cards: valid Hub metadata (YAML, model-index) and a body whose numbers come from the model."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from conftest import compressed_model, tiny_resnet14
from huggingface_hub import ModelCard
from torch import nn

from smooth_hf.checkpoint.card import ModelCardInfo, render_model_card
from smooth_hf.checkpoint.compressed import save_pretrained
from smooth_hf.lowrank import LowRankConfig, compress, count_parameters


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    # A global budget with the stem and head kept dense: the card shows both factorised and dense rows.
    return compress(tiny_resnet14(), LowRankConfig(param_reduction=0.5, skip_first_last=True))


INFO = ModelCardInfo(
    model_name="resnet14_cifar-smooth-fashion-mnist",
    base_model="someone/resnet14-fashion-mnist",
    datasets=["zalando-datasets/fashion_mnist"],
    dataset_pretty_name="Fashion-MNIST",
    dataset_split="test",
    task="image-classification",
    metrics={"accuracy": 0.905},
    dense_metrics={"accuracy": 0.921},
    training={"first_order_coef": 0.01, "second_order_coef": 0.0, "nuclear_coef": 0.001, "epochs": 30},
    license="apache-2.0",
    tags=["fashion-mnist"],
    extra="## Limitations\n\nTrained on 28x28 grey images only.",
)


def front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match, "the card must start with YAML front matter"
    return yaml.safe_load(match.group(1))


def test_metadata_and_model_index(resnet, tmp_path):
    card = render_model_card(resnet, INFO, location="me/resnet14-smooth")
    path = tmp_path / "README.md"
    card.save(path)
    loaded = ModelCard.load(path)  # what the Hub and huggingface_hub read back

    data = loaded.data
    assert data.library_name == "smooth_hf"
    assert {"smooth_hf", "low-rank", "compression", "timm", "fashion-mnist"} <= set(data.tags)
    assert data.base_model == "someone/resnet14-fashion-mnist"
    assert data.datasets == ["zalando-datasets/fashion_mnist"]
    assert data.metrics == ["accuracy"]
    assert data.license == "apache-2.0"
    assert data.pipeline_tag == "image-classification"
    (result,) = data.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_name) == (
        "image-classification",
        "zalando-datasets/fashion_mnist",
        "Fashion-MNIST",
    )
    assert (result.metric_type, result.metric_value, result.dataset_split) == ("accuracy", 0.905, "test")

    raw = front_matter(path.read_text())
    model_index = raw["model-index"]
    assert model_index[0]["name"] == "resnet14_cifar-smooth-fashion-mnist"
    assert model_index[0]["results"][0]["metrics"][0] == {"type": "accuracy", "value": 0.905}


def test_body(resnet):
    text = str(render_model_card(resnet, INFO, location="me/resnet14-smooth"))
    report = resnet.lowrank_report
    assert "# resnet14_cifar-smooth-fashion-mnist" in text
    assert f"| before compression | {report.params_before:,} |" in text
    assert f"| after compression | {report.params_after:,} |" in text
    assert f"{report.reduction:.1%} fewer" in text
    assert "every unique parameter of the whole model" in text
    assert "global parameter budget: remove 50.0%" in text and "first and last layers kept dense" in text
    # Per-layer table: every supported layer, factorised or not, with its rank and energy.
    assert "| layer | kind | shape (out x in x kh x kw) | rank / full rank |" in text
    for layer in report.layers:
        row = next(line for line in text.splitlines() if line.startswith(f"| `{layer.name}` |"))
        if layer.rank is not None:
            assert f"| {layer.rank} / {layer.full_rank} |" in row and f"{layer.energy_kept:.4f}" in row
        else:
            assert f"dense ({layer.full_rank})" in row
    assert "| accuracy | 0.921 | 0.905 | -0.016 |" in text
    assert "| first_order_coef | 0.01 |" in text and "| epochs | 30 |" in text
    assert 'model = smooth_hf.from_pretrained("me/resnet14-smooth")' in text
    assert "import smooth_hf" in text
    assert text.rstrip().endswith("Trained on 28x28 grey images only.")


def test_minimal_card_without_info(resnet):
    text = str(render_model_card(resnet))
    data = front_matter(text)
    assert data["library_name"] == "smooth_hf"
    assert "model-index" not in data and "base_model" not in data and "datasets" not in data
    assert "## Results" not in text and "## Training" not in text
    assert "| layer | kind |" in text


def test_text_task_is_inferred_and_tables_escape_pipes():
    model, _ = compressed_model("bert")
    info = ModelCardInfo(datasets=["stanfordnlp/sst2"], metrics={"accuracy": 0.8}, training={"note": "a|b"})
    card = render_model_card(model, info)
    assert card.data.pipeline_tag == "text-classification"
    assert card.data.eval_results[0].task_type == "text-classification"
    assert "| note | a\\|b |" in str(card)
    assert "transformers" in card.data.tags


def test_card_of_a_reloaded_model_without_report_matches_the_report(resnet, tmp_path):
    """With no report (e.g. a checkpoint saved by an older version), counts are rebuilt from the layers."""
    model = copy.deepcopy(resnet)
    del model.lowrank_report
    text = str(render_model_card(model))
    report = resnet.lowrank_report
    assert f"| before compression | {report.params_before:,} |" in text
    assert f"| after compression | {count_parameters(model):,} |" in text
    assert "| n/a |" in text  # energies are a property of the dense weights, which are gone


def test_saved_card_is_the_rendered_card(resnet, tmp_path):
    folder = save_pretrained(resnet, tmp_path / "ckpt", model_card=INFO)
    card = ModelCard.load(folder / "README.md")
    assert card.data.eval_results[0].metric_value == 0.905
    assert f'smooth_hf.from_pretrained("{tmp_path / "ckpt"}")' in card.text


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"metrics": {"accuracy": 0.9}}, "needs a task and a dataset"),
        ({"metrics": {"accuracy": float("nan")}, "datasets": ["d"]}, "finite numbers"),
        ({"metrics": {"accuracy": "high"}, "datasets": ["d"]}, "finite numbers"),
    ],
)
def test_invalid_metrics(resnet, kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        render_model_card(resnet, ModelCardInfo(**kwargs))


def test_needs_a_compressed_model():
    with pytest.raises(ValueError, match=r"smooth_hf\.compress"):
        render_model_card(nn.Linear(2, 2))
