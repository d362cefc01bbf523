"""Compatible requests share one denoising batch and each still gets the images it gets alone."""

from __future__ import annotations

import pytest
import torch

from harmonica_core.cache.methods import fora_plan
from harmonica_core.sampling import GenerationRequest, generate, generate_batch

TOLERANCE = {"atol": 2e-5, "rtol": 1e-5}


@pytest.mark.parametrize("mode", ["eager", "precomputed"])
def test_each_request_of_a_batch_gets_its_own_images(mode, digits):
    requests = [
        GenerationRequest(class_labels=[1], steps=10, seed=11),
        GenerationRequest(class_labels=[2, 5], num_images_per_prompt=2, steps=10, seed=22),
        GenerationRequest(class_labels=[7], steps=10, seed=33),
    ]
    plan = fora_plan(10, len(digits.branch_layout), 2)
    batch = generate_batch(digits, requests, plan, mode=mode)
    assert [r.labels for r in batch] == [["1"], ["2", "2", "5", "5"], ["7"]]
    for request, result in zip(requests, batch, strict=True):
        alone = generate(digits, request, plan, mode=mode)
        torch.testing.assert_close(result.images, alone.images, **TOLERANCE)
    assert not torch.allclose(batch[0].images, batch[2].images)  # own seeds, own labels


def test_prompt_embedding_requests_share_a_batch(tiny_pixart, prompt_embeddings):
    requests = [
        GenerationRequest(prompt_embeddings=prompt_embeddings.select([1]), steps=4, guidance=4.5, seed=1, height=8),
        GenerationRequest(
            prompt_embeddings=prompt_embeddings, num_images_per_prompt=2, steps=4, guidance=4.5, seed=2, height=8
        ),
    ]
    batch = generate_batch(tiny_pixart, requests)
    assert [len(r.images) for r in batch] == [1, 4]
    for request, result in zip(requests, batch, strict=True):
        torch.testing.assert_close(result.images, generate(tiny_pixart, request).images, **TOLERANCE)


def test_requests_that_cannot_share_a_batch_are_refused(digits):
    with pytest.raises(ValueError, match="differ in steps"):
        generate_batch(digits, [GenerationRequest(class_labels=[1], steps=4), GenerationRequest(class_labels=[1])])
    with pytest.raises(ValueError, match="differ in guidance"):
        generate_batch(digits, [GenerationRequest(class_labels=[1]), GenerationRequest(class_labels=[1], guidance=3)])
    with pytest.raises(ValueError, match="class labels, prompts"):
        generate_batch(digits, [GenerationRequest(class_labels=[1]), GenerationRequest(prompts=["a cat"])])
