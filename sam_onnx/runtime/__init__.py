"""Running graphs, without torch: sessions (providers and why they fall back), images and
transforms in numpy, ``SamOnnxPredictor`` and the automatic mask generator."""
