"""Built-in tables for :mod:`xlora.demo.domains`: small real molecules, words, capitals, antonyms."""

from __future__ import annotations

# Small real molecules (SMILES as commonly written; canonicalised with RDKit at use).
MOLECULES = (
    "O", "N", "C", "CO", "CCO", "CC(C)O", "CC(=O)O", "C=O", "CC=O", "CC(C)=O", "OCCO", "OCC(O)CO",
    "C1CCCCC1", "C1CCCC1", "C1CCOC1", "C1COCCO1", "C1CCNCC1", "C1CCNC1", "C1CNCCN1", "C1CCOCC1",
    "c1ccccc1", "Cc1ccccc1", "Oc1ccccc1", "Nc1ccccc1", "c1ccncc1", "c1ccoc1", "c1ccsc1", "c1cc[nH]c1",
    "c1cn[nH]c1", "c1c[nH]cn1", "c1ncncn1", "c1ccc2ccccc2c1", "c1ccc2cc3ccccc3cc2c1", "c1ccc(cc1)-c1ccccc1",
    "c1ccc2[nH]ccc2c1", "c1ccc2ncccc2c1", "c1ncc2nc[nH]c2n1", "O=C(O)c1ccccc1", "O=Cc1ccccc1",
    "CC(=O)Oc1ccccc1C(=O)O", "CC(=O)Nc1ccc(O)cc1", "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
    "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "OC[C@H]1OC(O)[C@H](O)[C@@H](O)[C@@H]1O", "NCC(=O)O", "CC(N)C(=O)O",
    "CC(C)C(N)C(=O)O", "CC(C)CC(N)C(=O)O", "CCC(C)C(N)C(=O)O", "OCC(N)C(=O)O", "CC(O)C(N)C(=O)O",
    "NC(Cc1ccccc1)C(=O)O", "NC(Cc1ccc(O)cc1)C(=O)O", "NC(Cc1c[nH]c2ccccc12)C(=O)O", "NC(CS)C(=O)O",
    "CSCCC(N)C(=O)O", "NC(CC(=O)O)C(=O)O", "NC(CCC(=O)O)C(=O)O", "NCCCCC(N)C(=O)O", "O=C1CCCN1",
    "OC(=O)CC(O)(CC(=O)O)C(=O)O", "CC(O)C(=O)O", "OC(=O)C(=O)O", "OC(=O)CCC(=O)O", "OC(=O)C=CC(=O)O",
    "NC(N)=O", "NC(=O)c1cccnc1", "CCN(CC)CC", "CN(C)C=O", "CS(C)=O", "CC#N", "ClC(Cl)Cl", "ClCCl",
    "FC(F)(F)C(=O)O", "c1ccc(cc1)O", "COc1ccccc1", "CCOC(=O)C", "CCOCC", "CCCCCCCCCCCCCCCC(=O)O",
    "CC(C)(C)O", "CC(C)(C)c1ccc(O)cc1", "Oc1ccc(O)cc1", "Oc1cccc(O)c1", "Oc1ccccc1O", "Nc1ccc(N)cc1",
    "O=[N+]([O-])c1ccccc1", "Clc1ccccc1", "Brc1ccccc1", "Ic1ccccc1", "Fc1ccccc1", "N#Cc1ccccc1",
    "OC(=O)c1ccccc1O", "COC(=O)c1ccccc1O", "CC(=O)c1ccccc1", "c1ccc(cc1)C(=O)c1ccccc1", "OCc1ccccc1",
    "CCc1ccccc1", "C=Cc1ccccc1", "Cc1ccccc1C", "Cc1cccc(C)c1", "Cc1ccc(C)cc1", "CCCCO", "CCCCCO",
    "CC(C)CO", "CCC(C)O", "OC1CCCCC1", "O=C1CCCCC1", "NC1CCCCC1", "C1=CCCCC1", "C1=CC=CC1", "C=CC=C",
    "CC=CC", "C#C", "CC#C", "C=C", "CC=C", "OCC=C", "NCCO", "NCCN", "OCCN(CCO)CCO", "CN", "CNC", "CN(C)C",
    "CCN", "C(=O)(O)CN(CC(=O)O)CC(=O)O", "COC", "CSC", "CS", "CCS", "C1CO1", "C1CN1", "C1CC1", "C1CCC1",
    "CC1=CC(=O)C=CC1=O", "O=C1C=CC(=O)C=C1", "O=C1NC(=O)C=C1", "O=c1cc[nH]c(=O)[nH]1", "Nc1ncnc2[nH]cnc12",
    "Nc1ccn(C)c(=O)n1", "Cc1c[nH]c(=O)[nH]c1=O", "CC12CCC3C(CCC4=CC(=O)CCC34C)C1CCC2O",
)

# Substituents for ring enumerations (written as a branch on an aromatic or aliphatic ring atom).
RING_SUBSTITUENTS = (
    "F", "Cl", "Br", "I", "O", "N", "C", "CC", "C(=O)O", "C=O", "C#N", "[N+](=O)[O-]", "OC",
    "C(F)(F)F", "C(C)=O", "S", "C(N)=O", "NC(C)=O",
)

WORDS = (
    "apple", "river", "stone", "cloud", "garden", "window", "pencil", "rocket", "forest", "candle",
    "mirror", "planet", "silver", "island", "bridge", "tiger", "violin", "anchor", "desert", "engine",
    "falcon", "ginger", "harbor", "jacket", "kettle", "lemon", "marble", "needle", "orange", "pepper",
    "quartz", "rabbit", "saddle", "tomato", "umbrella", "valley", "walnut", "yellow", "zebra", "basket",
    "castle", "dragon", "feather", "glacier", "hammer", "igloo", "jungle", "kitten", "ladder", "meadow",
    "nectar", "oyster", "parrot", "quiver", "ribbon", "shadow", "thunder", "unicorn", "velvet", "whistle",
    "bottle", "copper", "dinner", "finger", "guitar", "honey", "insect", "jelly", "kingdom", "lantern",
    "monkey", "nickel", "office", "puzzle", "rain", "sugar", "table", "uncle", "vessel", "wagon",
    "bread", "chair", "dream", "earth", "flame", "grape", "heart", "ivory", "juice", "knife",
    "light", "music", "night", "ocean", "piano", "queen", "robot", "snake", "train", "water",
)

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Canada": "Ottawa",
    "Australia": "Canberra", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna",
    "Greece": "Athens", "Turkey": "Ankara", "Ireland": "Dublin", "Netherlands": "Amsterdam",
    "Belgium": "Brussels", "Switzerland": "Bern", "Hungary": "Budapest", "Czechia": "Prague",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila",
    "South Korea": "Seoul", "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogota", "Cuba": "Havana",
    "Iran": "Tehran", "Iraq": "Baghdad", "Israel": "Jerusalem", "Saudi Arabia": "Riyadh", "Morocco": "Rabat",
    "Ethiopia": "Addis Ababa", "Ghana": "Accra", "Pakistan": "Islamabad", "Bangladesh": "Dhaka",
    "New Zealand": "Wellington", "Iceland": "Reykjavik", "Ukraine": "Kyiv", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Malaysia": "Kuala Lumpur",
    "Singapore": "Singapore", "Venezuela": "Caracas", "Uruguay": "Montevideo",
}

ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down",
    "open": "closed", "early": "late", "strong": "weak", "rich": "poor", "old": "young", "hard": "soft",
    "wet": "dry", "full": "empty", "high": "low", "long": "short", "loud": "quiet", "near": "far",
    "thick": "thin", "wide": "narrow", "clean": "dirty", "true": "false", "win": "lose", "push": "pull",
    "buy": "sell", "give": "take", "begin": "end", "inside": "outside", "above": "below", "before": "after",
    "heavy": "light", "cheap": "expensive", "easy": "difficult", "friend": "enemy", "love": "hate",
    "day": "night", "north": "south", "east": "west", "first": "last", "left": "right", "sweet": "sour",
    "arrive": "leave", "accept": "reject", "ancient": "modern", "brave": "cowardly", "deep": "shallow",
    "increase": "decrease", "maximum": "minimum", "positive": "negative", "question": "answer",
}

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")

_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for ``0 <= n <= 999``: ``347 -> 'three hundred forty-seven'``."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words handles 0..999, got {n}")
    if n < 20:
        return _UNITS[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _UNITS[n % 10])
    rest = n % 100
    return _UNITS[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
