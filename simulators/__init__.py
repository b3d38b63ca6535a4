"""Stand-ins for hardware: analytic problems, tables of real experiments, simulated devices."""

from simulators.devices import Behaviour, InstrumentFault, make_simulated_device
from simulators.problems import ANALYTIC, ProblemError, SimProblem, load_problem, load_table, regret

__all__ = ["ANALYTIC", "Behaviour", "InstrumentFault", "ProblemError", "SimProblem",
           "load_problem", "load_table", "make_simulated_device", "regret"]
