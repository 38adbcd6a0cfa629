"""A VISOR checkpoint carries VISOR's model card: `save_pretrained` writes it into a folder that has none, and
`push_to_hub` (model or processor, in either order) never leaves transformers' generic "Model Card for Model ID" on
the Hub. Offline: huggingface_hub's repo creation, commit and card download are replaced by recorders (as in
tests/test_convert.py), while transformers' own `create_and_tag_model_card` runs, so the generic card it makes is the
one a real push would upload.
"""


import huggingface_hub
import pytest
from huggingface_hub import ModelCard

from visor_hf import VisorForConditionalGeneration, VisorProcessor
from visor_hf.configuration_visor import is_generic_model_card, model_card_text
from visor_hf.demo import DEFAULT_MODEL

REPO = "someone/visor-toy"


@pytest.fixture(scope="module")
def toy():
    return VisorForConditionalGeneration.from_pretrained(DEFAULT_MODEL), VisorProcessor.from_pretrained(DEFAULT_MODEL)


@pytest.fixture
def hub(offline_hub):
    """The Hub as a dict {repo_id: {path: bytes}} (conftest's `offline_hub`)."""
    return offline_hub


def card(files) -> str:
    return files["README.md"].decode()


def assert_visor_card(text: str, config):
    assert not is_generic_model_card(text), text[:300]
    assert "# VISOR" in text and "library_name: transformers" in text and "trust_remote_code=True" in text
    assert f"| cross-attention after layers (`cross_attn_layers`) | {config.cross_attn_layers} |" in text
    for configuration in config.configurations:  # every budget is listed with its layers
        assert f"| `{len(configuration)}` | {list(configuration) or 'none'} |" in text


def test_card_text_states_the_configuration(toy):
    model, _ = toy
    text = model_card_text(model.config, repo_id=REPO)
    assert_visor_card(text, model.config)
    assert f'from_pretrained("{REPO}", trust_remote_code=True)' in text
    assert '"auto"' in text  # the toy checkpoint has a routing token, so "auto" is offered


def test_generic_card_is_recognised():
    generic = ModelCard.from_template(huggingface_hub.ModelCardData(library_name="transformers"),
                                      model_description="This model card has been automatically generated.")
    assert is_generic_model_card(str(generic)) and is_generic_model_card(None) and is_generic_model_card("\n")
    assert not is_generic_model_card("---\nlicense: mit\n---\n# My VISOR\n")


def test_save_pretrained_writes_the_card_and_keeps_one_already_there(toy, tmp_path):
    model, _ = toy
    model.save_pretrained(tmp_path / "fresh")
    assert_visor_card((tmp_path / "fresh" / "README.md").read_text(), model.config)

    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "README.md").write_text("# my notes\n")
    model.save_pretrained(tmp_path / "edited")
    assert (tmp_path / "edited" / "README.md").read_text() == "# my notes\n"


@pytest.mark.parametrize("order", ["model first", "processor first", "processor alone"])
def test_push_to_hub_uploads_the_visor_card(toy, hub, order):
    model, processor = toy
    pushes = {"model first": [model, processor], "processor first": [processor, model], "processor alone": [processor]}
    for obj in pushes[order]:
        obj.push_to_hub(REPO)
    files = hub[REPO]
    if order == "processor alone":  # no config to describe: the processor uploads no card rather than the generic one
        assert "README.md" not in files or not is_generic_model_card(card(files))
        return
    assert_visor_card(card(files), model.config)
    assert f'from_pretrained("{REPO}", trust_remote_code=True)' in card(files)


def test_push_keeps_a_card_already_on_the_hub(toy, hub):
    model, processor = toy
    hub[REPO] = {"README.md": b"---\nlicense: apache-2.0\n---\n# Our VISOR, trained on our data\n"}
    model.push_to_hub(REPO)
    processor.push_to_hub(REPO)
    assert "# Our VISOR, trained on our data" in card(hub[REPO])


def test_save_pretrained_with_push_to_hub(toy, hub, tmp_path):
    model, _ = toy
    model.save_pretrained(tmp_path / "visor-toy", push_to_hub=True, repo_id=REPO)
    assert_visor_card(card(hub[REPO]), model.config)
