"""edgesmith sweep: many variants of a model, measured, with the best choice per target."""
