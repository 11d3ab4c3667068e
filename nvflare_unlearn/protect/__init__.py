"""What a hostile or curious federation member meets: screening and robust aggregation of site reports (``robust``),
the privacy controls of the uploads (``privacy``: min-count, clipping, Gaussian noise), and the audit record of an
unlearning: what it holds and how a job's outcome becomes one (``record``), who signed it (``signing``), and whether
it matches the files an auditor holds (``verify``).

May import ``method``, ``models``, ``options``, ``_validation``; never ``evaluation``, ``fl``, ``cli`` or nvflare.
"""
