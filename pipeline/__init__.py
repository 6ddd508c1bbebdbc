"""VideoMamba video-text pretraining pipeline."""
