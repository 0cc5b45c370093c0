"""Vocabulary of :mod:`xlora.demo.wording`: property alias sets, units, verbs, nouns, contexts, frame families.

Every pool is a pair ``(seen, unseen)``: the seen entries word ``train``, ``validation`` and ``test``; the
unseen ones (whole alias sets, whole frame families) only ``test_unseen``. No unseen phrase occurs in a
seen entry of the same role, so a prompt with an unseen alias could not have been memorised.

Frames are :meth:`str.format` strings over *parts* (``{verb}``, ``{prop}``, ``{thing}``, ``{unit}``,
``{dec}``, ``{want}``, ``{v}``, ...), which the composer fills from these pools (a part may contain
further parts and content slots), and *content slots* (``{x}``, ``{lo}``, ``{e}``, ...) filled with the item.
"""

from __future__ import annotations

Pool = tuple[tuple[str, ...], tuple[str, ...]]  # (seen, unseen)

# property key -> (seen aliases, held-out alias set)
PROPERTY_ALIASES: dict[str, Pool] = {
    "mw": (("molecular weight", "MW", "mol. weight", "molecular mass"), ("molar mass", "formula weight")),
    "pi": (("isoelectric point", "pI", "isoelectric pH"), ("pH of zero net charge", "point of zero charge")),
    "gravy": (("GRAVY", "GRAVY score", "grand average of hydropathy"),
              ("mean Kyte-Doolittle hydropathy", "average hydropathicity")),
    "instability": (("instability index", "Guruprasad instability index", "II"),
                    ("in-vitro stability score", "predicted instability value")),
    "logp": (("logP", "Crippen logP", "calculated logP"),
             ("octanol-water partition coefficient", "lipophilicity (cLogP)")),
    "rings": (("rings", "ring closures in the SSSR"), ("cycles", "cyclic units")),
    "hbd": (("hydrogen-bond donors", "H-bond donors", "HBD count"), ("donor hydrogens", "proton-donor groups")),
    "hba": (("hydrogen-bond acceptors", "H-bond acceptors", "HBA count"), ("acceptor atoms", "lone-pair acceptors")),
    "gap": (("HOMO-LUMO gap", "HOMO-LUMO energy gap", "H-L gap"), ("frontier orbital gap", "band gap")),
    "homo": (("HOMO energy", "highest occupied orbital energy", "E(HOMO)"),
             ("energy of the highest occupied molecular orbital", "HOMO level")),
    "lumo": (("LUMO energy", "lowest unoccupied orbital energy", "E(LUMO)"),
             ("energy of the lowest unoccupied molecular orbital", "LUMO level")),
    "dipole": (("dipole moment", "molecular dipole", "dipole"), ("electric polarity", "charge-separation moment")),
    "hydration": (("hydration free energy", "free energy of hydration", "dG_hyd"),
                  ("solvation free energy in water", "hydration delta-G")),
    "logs": (("aqueous solubility (logS)", "logS", "log solubility"),
             ("log molar solubility in water", "water solubility as log10 mol/L")),
    "force": (("peak force", "maximum pulling force", "rupture force"),
              ("largest force while stretching", "unfolding force maximum")),
    "work": (("pulling work", "mechanical work", "work done by the spring"),
             ("energy spent stretching", "integrated force over the extension")),
}

# unit key -> (seen spellings, held-out spellings); "" = the property has no unit
UNITS: dict[str, Pool] = {
    "Da": (("Da", "daltons"), ("unified atomic mass units",)),
    "g/mol": (("g/mol", "g mol^-1"), ("grams per mole",)),
    "eV": (("eV", "electronvolts"), ("electron volts",)),
    "D": (("debye", "D"), ("Debye units",)),
    "kcal/mol": (("kcal/mol", "kcal mol^-1"), ("kilocalories per mole",)),
    "log(mol/L)": (("log(mol/L)", "log units"), ("log10 of mol per litre",)),
    "pN": (("pN", "piconewtons"), ("pico-newtons",)),
    "kJ/mol": (("kJ/mol", "kJ mol^-1"), ("kilojoules per mole",)),
    "": (("",), ("",)),
}

UNIT_CLAUSE: Pool = ((" in {unit_word}", " ({unit_word})", " [{unit_word}]"), (" expressed in {unit_word}",))
DECIMALS: Pool = (("Give {decimals} decimals.", "Round to {decimals} decimal places.", "({decimals} d.p.)", ""),
                  ("Keep {decimals} digits after the point.",))

# things the content is, by noun class -> (seen, unseen)
THINGS: dict[str, Pool] = {
    "peptide": (("the protein", "the peptide", "the sequence", "the amino-acid sequence"),
                ("the polypeptide chain", "the residue string")),
    "molecule": (("the molecule", "the compound", "the SMILES", "the structure"),
                 ("the chemical species", "the substance")),
}

VERBS: dict[str, Pool] = {  # intent verbs by frame class
    "forward": (("compute", "calculate", "estimate", "predict", "give", "report"),
                ("work out", "determine", "figure out")),
    "design": (("design", "propose", "suggest", "write", "give"), ("come up with", "invent", "dream up")),
    "count": (("count", "give the number of", "tell me the number of"), ("tally", "enumerate")),
}

# range constraints of inverse tasks (may contain {prop}, {unit_clause}, {lo}, {hi})
RANGES: Pool = (("{prop} between {lo} and {hi}{unit_clause}", "{prop} in the range [{lo}, {hi}]{unit_clause}",
                 "a {prop} from {lo} to {hi}{unit_clause}", "{prop} within {lo}-{hi}{unit_clause}"),
                ("{prop} no lower than {lo} and no higher than {hi}{unit_clause}",
                 "{prop} falling inside the interval {lo} .. {hi}{unit_clause}"))
EXACT: Pool = (("exactly {lo} {prop}", "precisely {lo} {prop}", "{prop}: exactly {lo}"),
               ("a total of {lo} {prop}, no more and no fewer",))

VARIABLES: Pool = (("x", "y", "n", "t"), ("z", "k", "m"))
EQUATIONS: Pool = (("{a}{v} {pm} {babs} = {c}", "{a}*{v} {pm} {babs} = {c}"), ("{c} = {a}{v} {pm} {babs}",))

# domain-neutral context sentences (so they cannot carry routing information); "" = none
CONTEXTS: Pool = (("", "Quick question.", "For a lab report:", "Please help with this.", "Hi!",
                   "I am checking my notes."),
                  ("My supervisor asked me this.", "Sanity check for a draft:", "Off the top of your head:"))
CLOSINGS: Pool = (("", "Thanks.", "Thank you!", "Be concise."), ("Cheers.", "Much appreciated."))
CASINGS: Pool = (("as written", "lower"), ("as written", "lower", "upper"))
ENDINGS: Pool = (("keep", "drop"), ("keep", "drop"))

# frame class -> family -> frames; HELD_OUT_FAMILIES lists the families only test_unseen uses
FRAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "forward": {
        "question": ("What is the {prop} of {thing} {x}?{unit_clause} {dec}",
                     "What {prop} does {thing} {x} have?{unit_clause} {dec}"),
        "imperative": ("{verb} the {prop} of {thing} {x}{unit_clause}. {dec}",
                       "{verb} the {prop}{unit_clause} for {thing} {x}. {dec}"),
        "label": ("{thing}: {x}\n{prop}{unit_clause}? {dec}", "Input: {x}\nProperty: {prop}{unit_clause}. {dec}"),
        "request": ("Could you {verb} the {prop} of {x}{unit_clause}? {dec}",
                    "Please {verb} the {prop} for this input: {x}. {dec}"),
        "statement": ("I have {thing} {x}. {verb} its {prop}{unit_clause}. {dec}",
                      "Given {thing} {x}, {verb} the {prop}{unit_clause}. {dec}"),
        "inverted": ("{x} is {thing} in question; what value does its {prop} take{unit_clause}? {dec}",
                     "Regarding {x}: the {prop}{unit_clause} comes out to what? {dec}"),
        "task_card": ("Task - {prop} prediction{unit_clause}.\nEntry = {x}\nAnswer with the number. {dec}",
                      "[{prop}{unit_clause}] {x} -> ? {dec}"),
    },
    "count": {
        "question": ("How many {prop} does {thing} {x} have?", "What is the number of {prop} in {x}?"),
        "imperative": ("{verb} the {prop} in {thing} {x}.", "{verb} {prop} for {x}."),
        "label": ("{thing}: {x}\nNumber of {prop}?", "{x}: how many {prop}?"),
        "inverted": ("Looking at {x}, {verb} its {prop}, please.", "Regarding {thing} {x}: {prop}, how many?"),
    },
    "design": {
        "imperative": ("{verb} {thing} with {want}.", "{verb} {thing} that has {want}."),
        "request": ("I need {thing} with {want}; please {verb} one.", "Can you {verb} {thing} having {want}?"),
        "label": ("Target: {want}.\n{verb} {thing}.", "Constraint: {want}. {verb} {thing} that matches."),
        "wish": ("Imagine {thing} meeting this: {want}; {verb} such a candidate.",
                 "Suppose we want {want}: {verb} {thing} for it."),
    },
    "linear": {
        "imperative": ("Solve for {v}: {eqn}.", "Find {v} if {eqn}.", "Solve the equation {eqn}.",
                       "Determine {v} such that {eqn}."),
        "question": ("What is {v} in {eqn}?", "{eqn}. {v} = ?", "If {eqn}, what is {v}?"),
        "rhetorical": ("Which value of {v} satisfies {eqn}?", "Work out {v} given that {eqn}."),
    },
}
HELD_OUT_FAMILIES: dict[str, tuple[str, ...]] = {"forward": ("inverted", "task_card"), "count": ("inverted",),
                                                "design": ("wish",), "linear": ("rhetorical",)}

DESIGN_THINGS: dict[str, Pool] = {  # what an inverse task asks for (content {n}: a length)
    "peptide": (("a peptide of {n} residues", "a {n}-residue sequence", "an amino-acid sequence of length {n}"),
                ("a chain of {n} amino acids", "a polypeptide, {n} residues long")),
    "molecule": (("a molecule (as SMILES)", "a compound, written as SMILES", "a SMILES string"),
                 ("a structure in SMILES notation", "some chemical (SMILES only)")),
}

# The scaling head's data only (``compose(..., wide=True)``): more seen entries per role, so that the head meets
# more than one or two wordings of each property, frame and context before it meets a stranger's. The experts'
# splits, validation and test keep the pools above; nothing here shares a phrase with a held-out entry.
WIDE_ALIASES: dict[str, tuple[str, ...]] = {
    "mw": ("average mass", "total mass", "M.W."), "pi": ("IEP", "isoelectric value", "pI value"),
    "gravy": ("GRAVY index", "GRAVY value", "hydrophobicity score (GRAVY)"),
    "instability": ("Guruprasad index", "II value", "instability (Guruprasad)"),
    "logp": ("log P", "logP (Crippen)", "logP value"), "rings": ("ring count", "SSSR rings", "ring systems"),
    "hbd": ("donors", "HBD", "H-donors"), "hba": ("acceptors", "HBA", "H-acceptors"),
    "gap": ("HOMO/LUMO gap", "HL gap", "HOMO to LUMO gap"), "homo": ("HOMO", "HOMO eigenvalue", "E_HOMO"),
    "lumo": ("LUMO", "LUMO eigenvalue", "E_LUMO"), "dipole": ("dipole magnitude", "total dipole", "|mu|"),
    "hydration": ("hydration energy", "dG(hyd)", "hydration free-energy value"),
    "logs": ("solubility (logS)", "log S", "logS value"),
    "force": ("maximum force", "peak pulling force", "max force"),
    "work": ("work of pulling", "total work", "pull work"),
}
WIDE_CONTEXTS = ("Homework help:", "Quick one.", "Hello.", "A colleague asked:", "Checking a calculation:")
WIDE_CLOSINGS = ("Thanks in advance.", "Short answer please.")
WIDE_VERBS: dict[str, tuple[str, ...]] = {"forward": ("find", "tell me", "provide"), "design": ("create", "make"),
                                          "count": ("list the number of",)}
WIDE_FRAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "forward": {"qa": ("Q: {prop} of {thing} {x}{unit_clause}? {dec}",
                       "Question: what {prop} would you give {x}{unit_clause}? {dec}"),
                "form": ("{prop}{unit_clause}\n- {thing}: {x}\n- {dec}", "Item: {x}\nWanted: {prop}{unit_clause}\n{dec}"),
                "note": ("Need the {prop} for {x}{unit_clause}, please. {dec}",
                         "{x} - {verb} the {prop}{unit_clause}. {dec}")},
    "count": {"qa": ("Q: number of {prop} in {x}?",), "form": ("Item: {x}\nWanted: number of {prop}",)},
    "design": {"qa": ("Q: could you {verb} {thing} with {want}?",),
               "form": ("Wanted: {thing}\nRequirement: {want}", "{want}\n- {verb} {thing}")},
    "linear": {"qa": ("Q: {eqn}; {v} = ?",)},
}
