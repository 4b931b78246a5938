"""Dataset builders: manifests of iHarmony4 and of any folder, and the bundled demo dataset."""
