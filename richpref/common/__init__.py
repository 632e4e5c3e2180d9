"""Generic helpers that import nothing else of richpref: images, fault injection, owned processes, object stores, CPU/model overlap."""
