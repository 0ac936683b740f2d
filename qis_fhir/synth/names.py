"""Synthetic names and places (invented combinations; digits appended as newer Synthea does)."""

from __future__ import annotations

GIVEN_FEMALE = (
    "Ariadna", "Beatriz", "Carolee", "Delphine", "Edda", "Fiorella", "Gwendolyn", "Hortense",
    "Ileana", "Jolanda", "Kirsi", "Ludmila", "Marisol", "Noemi", "Ottilie", "Perpetua", "Quilla",
    "Rosalind", "Solveig", "Tamsin", "Ulrike", "Valentina", "Winifred", "Xiomara", "Yolande", "Zelda",
)
GIVEN_MALE = (
    "Adan", "Bartholomew", "Cornelius", "Desmond", "Evander", "Fridolin", "Gaspard", "Horatio",
    "Ignatius", "Jaroslav", "Konstantin", "Leopold", "Maximilian", "Napoleon", "Octavius", "Percival",
    "Quentin", "Rasmus", "Sigismund", "Thaddeus", "Ulysses", "Valerian", "Wendelin", "Xavier",
    "Yannick", "Zebulon",
)
FAMILY = (
    "Abernathy", "Bergstrom", "Cassin", "Dooley", "Eichmann", "Farrell", "Gulgowski", "Hermiston",
    "Ivanova", "Jaskolski", "Kuhlman", "Lindgren", "Mertz", "Nikolaus", "Ortiz", "Pulido", "Quitzon",
    "Runolfsdottir", "Schowalter", "Tremblay", "Upton", "Vandervort", "Wisozk", "Yundt", "Zieme",
)
STREETS = (
    "Corwin Ferry", "Harbor Crossing", "Larkspur Row", "Millbrook Lane", "Quarry Way", "Tamarack Court",
    "Old Mill Road", "Bishop Gate", "Willow Bend", "Foundry Street",
)
CITIES = (
    ("Boston", "02110"), ("Worcester", "01608"), ("Springfield", "01103"), ("Lowell", "01852"),
    ("Cambridge", "02139"), ("New Bedford", "02740"), ("Brockton", "02301"), ("Quincy", "02169"),
)
