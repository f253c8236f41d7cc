"""The pieces of the training loop, knowing nothing of a workspace: the LR schedule and its fit to
a time budget (`schedule`), the two-view dataset, the batch sampler and cutmix (`data`), the
contrastive forward, loss and optimiser (`contrastive`), the batch size, the fit before an epoch,
one epoch and one step (`loop`), the CPU threads and bf16 choice (`cpu`), and the helpers for
several processes under torchrun (`distributed`). The `train` step (`cbir.steps.train`) puts
them together.
"""
