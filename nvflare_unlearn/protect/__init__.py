"""What a hostile or curious federation member meets: screening and robust aggregation of site reports, the
privacy controls of the uploads (min-count, clipping, Gaussian noise), and the audit record of an unlearning.

May import ``method``, ``models``, ``options``, ``_validation``; never ``evaluation``, ``fl``, ``cli`` or nvflare.
"""
