"""`q2g sweep`: Optuna sweeps of stage 2 (space, study and workers, trials, Pareto report); entry point in cli.py."""
