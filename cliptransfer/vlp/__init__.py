"""V&L pretraining on CLIP grids (CLIP-ViL_p / LXMERT): corpus, objectives, model glue."""
