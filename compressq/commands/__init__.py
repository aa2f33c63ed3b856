"""One module per CLI command: options in, one call to the library, a rendered result out."""
