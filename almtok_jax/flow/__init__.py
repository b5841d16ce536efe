"""Flow-matching decoder: the DiT estimator (:mod:`.dit`), its training loss and samplers (:mod:`.cfm`)."""
