"""RefCOCO-family data into FiftyOne: each source (jxu124's Hub datasets, the REFER and gRefCOCO
files, RefCOCO-M, the combined refcocox) behind one interface, and the resumable importer."""
