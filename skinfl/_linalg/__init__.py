"""Matrix-free linear algebra shared by the solvers: conjugate gradient, Nystroem sketches."""
