"""The CUDA path (marked `cuda`, excluded from CI and from `make test`; `make test-cuda` on a GPU machine):
every architecture on one GPU against transformers' CPU fp32 reference, and pp=2 over NCCL against one GPU
process (also marked `multi_gpu`: NCCL needs a GPU per rank).

On CUDA, fp32 products may run in TF32 in cuDNN convolutions (the Gated DeltaNet conv), so logprobs are
checked within CUDA_TOL instead of the CPU's 1e-4; greedy tokens must be equal."""

import pytest
import torch
from test_models_vs_hf import PROMPTS, assert_matches_reference, engine_greedy

from support.checkpoints import KINDS

pytestmark = pytest.mark.cuda

CUDA_TOL = 2e-3


@pytest.fixture(autouse=True)
def gpu():
    assert torch.cuda.is_available(), "these tests need a CUDA GPU (run them with -m cuda on a GPU machine)"


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_transformers(ckpt, kind):
    outs = engine_greedy(ckpt(kind), PROMPTS, device="cuda")
    assert_matches_reference(ckpt(kind), PROMPTS, outs, tol=CUDA_TOL)


@pytest.mark.multi_gpu
@pytest.mark.parametrize("kind", ["qwen3_5_moe", "llama"])
def test_cuda_pp2_over_nccl_matches_one_gpu(ckpt, kind):
    assert torch.cuda.device_count() >= 2, "pp=2 over NCCL needs two GPUs"
    single = engine_greedy(ckpt(kind), PROMPTS, device="cuda")
    piped = engine_greedy(ckpt(kind), PROMPTS, device="cuda", pp_size=2, num_micro_batches=1)
    for a, b in zip(single, piped):
        assert a["output_ids"] == b["output_ids"]
        lp_a = [lp for lp, _ in a["meta_info"]["output_token_logprobs"]]
        lp_b = [lp for lp, _ in b["meta_info"]["output_token_logprobs"]]
        assert max(abs(x - y) for x, y in zip(lp_a, lp_b)) < 1e-4
