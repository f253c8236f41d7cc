"""The synthetic demo collection's pictures: procedural old photographs (`paintings`, drawn by
the `painter`) and their archival copies (`copies`). Pictures in, pictures out: writing the
collection is the `demo` step's (`cbir.steps.demo`)."""
