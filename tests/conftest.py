from types import SimpleNamespace

import pytest
import torch

from visor_hf import VisorForConditionalGeneration
from visor_hf.testing import tiny_inputs, tiny_llava_onevision

# Two samples with images of different aspect ratios (anyres with several crops), left padding.
IMAGE_SIZES = [(56, 112), (112, 112)]
PROMPT_LENGTHS = [(3, 4), (2, 7)]


@pytest.fixture(scope="session")
def llava():
    return tiny_llava_onevision()


@pytest.fixture(scope="session")
def batch(llava):
    return tiny_inputs(llava, IMAGE_SIZES, PROMPT_LENGTHS)


def perturb_new_parameters(model, seed=0):
    """Move every VISOR-only parameter (gates, CPE, cross-attention) away from its identity init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.new_parameters().values():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def routed_visor(llava):
    """A model with a router: routing token 251 (`test_router.ROUTING_TOKEN_ID`), cross-attention (0, 3, 5), self-attention
    (1, 4), new parameters perturbed (seed 1). Configurations (), (4,), (1, 4); the router reads before layer 1."""
    from .test_router import ROUTING_TOKEN_ID

    model = VisorForConditionalGeneration.from_llava_onevision(
        llava, cross_attn_layers=[0, 3, 5], self_attn_layers=[1, 4], routing_token_id=ROUTING_TOKEN_ID
    ).eval()
    assert model.config.configurations == [[], [4], [1, 4]] and model.config.router_layer == 1
    return perturb_new_parameters(model, seed=1)


@pytest.fixture(scope="session")
def visor(llava):
    """Default placement on the 6-layer tiny model: self-attention layers (1, 4), cross-attention (1, 3, 5)."""
    model = VisorForConditionalGeneration.from_llava_onevision(
        llava, cross_attn_layers=[1, 3, 5], self_attn_layers=[1, 4]
    ).eval()
    return perturb_new_parameters(model)


@pytest.fixture
def offline_hub(monkeypatch):
    """The Hub as a dict {repo_id: {path: bytes}}: commits add files, `ModelCard.load` reads README.md from it."""
    import huggingface_hub
    import transformers.utils.hub as transformers_hub
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import EntryNotFoundError

    repos: dict[str, dict[str, bytes]] = {}

    def create_repo(*args, **kwargs):
        repo_id = kwargs.get("repo_id") or next(a for a in args if isinstance(a, str))
        repos.setdefault(repo_id, {})
        return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

    def create_commit(*args, **kwargs):
        repo_id = kwargs.get("repo_id") or next(a for a in args if isinstance(a, str))
        for op in kwargs["operations"]:
            content = op.path_or_fileobj
            data = open(content, "rb").read() if isinstance(content, str) else bytes(getattr(content, "read", lambda: content)())
            repos.setdefault(repo_id, {})[op.path_in_repo] = data
        return SimpleNamespace(commit_url="https://huggingface.co/commit/0", oid="0" * 40, pr_url=None)

    def load_card(repo_id, *args, **kwargs):
        if "README.md" not in repos.get(repo_id, {}):
            raise EntryNotFoundError(f"{repo_id} has no README.md")
        return ModelCard(repos[repo_id]["README.md"].decode())

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: create_repo(*a, **k))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda self, *a, **k: create_commit(*a, **k))
    monkeypatch.setattr(transformers_hub, "create_repo", create_repo, raising=False)  # 4.57's module-level calls
    monkeypatch.setattr(transformers_hub, "create_commit", create_commit, raising=False)
    monkeypatch.setattr(ModelCard, "load", classmethod(lambda cls, repo_id, *a, **k: load_card(repo_id, *a, **k)))
    return repos
