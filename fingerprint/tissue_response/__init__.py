"""Tissue-response estimation for (multi-tissue) CSD: single-fibre white matter after
Tournier et al. (:mod:`.white_matter_response`) and white matter, grey matter and CSF
after Dhollander et al. (:mod:`.three_tissue_response`)."""
