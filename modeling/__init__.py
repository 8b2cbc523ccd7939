"""Hub-side modeling files of Vedas (installed as `vedas_hf.modeling`); only the two sibling files are uploaded."""
